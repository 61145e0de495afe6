/**
 * The answers each user got, newest last, as claas-ray completion ids: what `/feedback` refers to.
 * Bounded, and kept in a JSON file when one is given, so a gateway restart (or another OpenClaw process,
 * such as `openclaw agent --local`) still knows what a user's latest answer was.
 */

import { mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";

export interface Turn {
  completionId: string;
  adapterId: string;
  at: number;
}

export class TurnLog {
  readonly #file: string | undefined;
  readonly #perUser: number;
  readonly #maxUsers: number;
  #turns = new Map<string, Turn[]>();

  constructor(file?: string, perUser = 64, maxUsers = 10_000) {
    this.#file = file;
    this.#perUser = perUser;
    this.#maxUsers = maxUsers;
  }

  #load(): void {
    if (!this.#file) return;
    try {
      this.#turns = new Map(Object.entries(JSON.parse(readFileSync(this.#file, "utf8")) as Record<string, Turn[]>));
    } catch {
      // no file yet, or a torn one: start from what is in memory
    }
  }

  #save(): void {
    if (!this.#file) return;
    mkdirSync(dirname(this.#file), { recursive: true });
    const partial = `${this.#file}.${process.pid}.tmp`;
    writeFileSync(partial, JSON.stringify(Object.fromEntries(this.#turns)));
    renameSync(partial, this.#file); // atomic: readers see the old file or the new one
  }

  record(user: string, turn: Turn): void {
    this.#load();
    const turns = this.#turns.get(user) ?? [];
    this.#turns.delete(user); // re-insert: the Map's order is least recently active first
    turns.push(turn);
    this.#turns.set(user, turns.slice(-this.#perUser));
    if (this.#turns.size > this.#maxUsers) this.#turns.delete(this.#turns.keys().next().value as string);
    this.#save();
  }

  /** The user's latest `count` answers from one adapter, oldest first. */
  latest(user: string, count: number): Turn[] {
    this.#load();
    const turns = this.#turns.get(user) ?? [];
    const adapterId = turns.at(-1)?.adapterId;
    return turns.filter((turn) => turn.adapterId === adapterId).slice(-count);
  }
}

/**
 * The completion id of the last assistant message in an agent run: OpenClaw keeps the provider's response
 * id on each assistant message, and claas-ray's response id is its completion id.
 */
export function lastCompletionId(messages: unknown[]): string | undefined {
  for (let index = messages.length - 1; index >= 0; index--) {
    const message = messages[index] as { role?: string; responseId?: unknown };
    if (message?.role === "assistant" && typeof message.responseId === "string" && message.responseId) {
      return message.responseId;
    }
  }
  return undefined;
}
