/**
 * OpenClaw plugin for claas-ray: every user chats with their own LoRA adapter, and `/feedback <text>`
 * turns a reaction to the latest answer into one SDPO step on that adapter.
 *
 * - `before_model_resolve`: routes the user's turn to the model `openclaw/<user>` (created on first use).
 * - `agent_end`: records the claas-ray completion id of the answer the user got.
 * - `/feedback <text>`: sends the feedback for the user's latest answer(s) by completion id and replies
 *   with the outcome: applied with the new version, rejected with the reason, or the server's error.
 */

import { homedir } from "node:os";
import { join } from "node:path";

import { ClaasClient, ClaasError } from "./src/client.ts";
import { TurnLog, lastCompletionId } from "./src/turns.ts";

export interface ClaasPluginConfig {
  apiUrl?: string;
  apiKey?: string;
  adapterId?: string;
  batchSize?: number;
  waitSeconds?: number;
  turnsFile?: string;
}

/** The part of OpenClaw's plugin API this plugin uses. */
export interface PluginApi {
  pluginConfig?: Record<string, unknown>;
  logger?: { info?: (message: string) => void; warn?: (message: string) => void };
  on: (hook: string, handler: (event: any, ctx: any) => unknown) => void;
  registerCommand: (command: {
    name: string;
    description: string;
    acceptsArgs?: boolean;
    handler: (ctx: any) => Promise<{ text: string }>;
  }) => void;
}

const SEGMENT = /[^A-Za-z0-9._-]/g;

/** A sender id as one adapter-id segment: never a path, never '.' or '..'. */
export function userSegment(raw: unknown): string {
  const cleaned = String(raw ?? "").replace(SEGMENT, "_").slice(0, 64);
  return cleaned && !/^\.+$/.test(cleaned) ? cleaned : "anonymous";
}

function userOf(ctx: any): string {
  return userSegment(ctx?.senderId ?? ctx?.from ?? ctx?.sessionKey);
}

export function register(api: PluginApi): void {
  const config = (api.pluginConfig ?? {}) as ClaasPluginConfig;
  const client = new ClaasClient(config.apiUrl ?? "http://127.0.0.1:8000", config.apiKey);
  const template = config.adapterId ?? "openclaw/{user}";
  const batchSize = Math.max(1, Math.min(64, config.batchSize ?? 1));
  const waitSeconds = Math.max(1, Math.min(600, config.waitSeconds ?? 300));
  const turns = new TurnLog(config.turnsFile ?? join(process.env.OPENCLAW_STATE_DIR ?? join(homedir(), ".openclaw"), "claas-turns.json"));
  const created = new Set<string>();
  const adapterFor = (user: string) => template.replace("{user}", user);

  api.on("before_model_resolve", async (_event, ctx) => {
    const adapterId = adapterFor(userOf(ctx));
    try {
      if (!created.has(adapterId)) {
        await client.ensureAdapter(adapterId);
        created.add(adapterId);
      }
      return { modelOverride: adapterId };
    } catch (error) {
      api.logger?.warn?.(`claas: cannot use adapter ${adapterId}, answering with the configured model: ${(error as Error).message}`);
      return undefined;
    }
  });

  api.on("agent_end", (event, ctx) => {
    const completionId = lastCompletionId(event?.messages ?? []);
    if (event?.success === false || !completionId) return;
    const user = userOf(ctx);
    turns.record(user, { completionId, adapterId: adapterFor(user), at: Date.now() });
    api.logger?.info?.(`claas: answer ${completionId} recorded for ${user}`);
  });

  api.registerCommand({
    name: "feedback",
    description: "Teach your assistant: /feedback <what to change about its last answer>",
    acceptsArgs: true,
    handler: async (ctx) => {
      const text = String(ctx?.args ?? "").trim();
      if (!text) return { text: "Usage: /feedback <what to change>, e.g. /feedback shorter answers, please" };
      const user = userOf(ctx);
      const latest = turns.latest(user, batchSize);
      if (latest.length === 0) return { text: "There is no answer of mine to give feedback on yet: ask me something first." };
      const adapterId = latest[0].adapterId;
      try {
        const outcome = await client.feedback(latest.map((turn) => turn.completionId), text, waitSeconds);
        if (outcome.status === "applied") return { text: `Feedback applied: ${adapterId} is now version ${outcome.version}.` };
        if (outcome.status === "rejected") return { text: `Feedback not applied: ${outcome.reason ?? "rejected"}.` };
        return { text: `Feedback received (${outcome.status}); it will be applied shortly.` };
      } catch (error) {
        const status = error instanceof ClaasError && error.status ? ` (HTTP ${error.status})` : "";
        return { text: `Feedback failed${status}: ${(error as Error).message}` };
      }
    },
  });
  api.logger?.info?.(`claas: adapters ${template} on ${client.baseUrl}`);
}

export default {
  id: "claas",
  name: "claas-ray feedback",
  description: "Per-user LoRA adapters on claas-ray, trained from /feedback in chat.",
  register,
};
