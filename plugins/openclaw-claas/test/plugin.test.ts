/**
 * The plugin's code against a running claas-ray app (CLAAS_URL, and CLAAS_API_KEY of the tenant
 * `openclaw`): OpenClaw's side is the part of its plugin API the plugin uses, driven the way OpenClaw
 * drives it (hook events and a command context); claas-ray's side is real.
 *   CLAAS_URL=http://127.0.0.1:8000 CLAAS_API_KEY=... node --test test/*.test.ts
 */

import assert from "node:assert/strict";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import plugin, { register, userSegment, type PluginApi } from "../index.ts";

const URL = process.env.CLAAS_URL ?? "http://127.0.0.1:8000";
const KEY = process.env.CLAAS_API_KEY;

interface Host {
  hooks: Map<string, (event: any, ctx: any) => unknown>;
  command: (ctx: any) => Promise<{ text: string }>;
  logs: string[];
}

/** What OpenClaw hands a plugin at register time, recording what the plugin registers. */
function host(config: Record<string, unknown>): Host {
  const hooks = new Map<string, (event: any, ctx: any) => unknown>();
  const logs: string[] = [];
  let command: Host["command"] | undefined;
  const api: PluginApi = {
    pluginConfig: config,
    logger: { info: (m) => logs.push(m), warn: (m) => logs.push(m) },
    on: (name, handler) => hooks.set(name, handler),
    registerCommand: (definition) => {
      assert.equal(definition.name, "feedback");
      assert.equal(definition.acceptsArgs, true);
      command = definition.handler;
    },
  };
  register(api);
  assert.ok(command, "the plugin registers /feedback");
  return { hooks, command: command!, logs };
}

async function api(method: string, path: string, body?: unknown): Promise<any> {
  const response = await fetch(`${URL}${path}`, {
    method,
    headers: { "content-type": "application/json", authorization: `Bearer ${KEY}` },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, json: await response.json() };
}

test("the default export is an OpenClaw plugin entry", () => {
  assert.equal(plugin.id, "claas");
  assert.equal(plugin.register, register);
});

test("sender ids become one safe adapter-id segment", () => {
  assert.equal(userSegment("telegram:12345"), "telegram_12345");
  assert.equal(userSegment("../../etc/passwd"), ".._.._etc_passwd");
  assert.equal(userSegment(".."), "anonymous");
  assert.equal(userSegment(undefined), "anonymous");
  assert.equal(userSegment("x".repeat(200)).length, 64);
});

test("a turn and /feedback: the user's adapter is created on first use and its version increases", async () => {
  assert.ok(KEY, "CLAAS_API_KEY is the key of the tenant 'openclaw'");
  const user = `sam-${Date.now()}`;
  const claas = host({ apiUrl: URL, apiKey: KEY, turnsFile: join(mkdtempSync(join(tmpdir(), "claas-")), "turns.json") });
  const ctx = { senderId: user, sessionKey: `agent:main:telegram:${user}`, channel: "telegram", isAuthorizedSender: true };

  // OpenClaw resolves the model for the turn: the plugin routes it to the user's adapter, creating it.
  const resolved = (await claas.hooks.get("before_model_resolve")!({ prompt: "Tell me about the sea." }, ctx)) as any;
  assert.equal(resolved.modelOverride, `openclaw/${user}`);
  assert.equal((await api("GET", `/v1/lora/openclaw/${user}`)).json.latest_version, 0);

  // The turn itself, as OpenClaw's OpenAI-compatible provider sends it; the response id is the completion id.
  const messages = [{ role: "user", content: "Tell me about the sea." }];
  const chat = await api("POST", "/v1/chat/completions", { model: resolved.modelOverride, messages, max_tokens: 24, temperature: 0 });
  assert.equal(chat.status, 200, JSON.stringify(chat.json));
  await claas.hooks.get("agent_end")!({
    success: true,
    messages: [
      { role: "user", content: [{ type: "text", text: messages[0].content }] },
      { role: "assistant", content: [{ type: "text", text: chat.json.choices[0].message.content }], responseId: chat.json.id },
    ],
  }, ctx);
  assert.ok(claas.logs.some((line) => line.includes(chat.json.id)));

  const reply = await claas.command({ ...ctx, args: "Answer only in French.", commandBody: "/feedback Answer only in French." });
  assert.match(reply.text, new RegExp(`^Feedback applied: openclaw/${user} is now version 1\\.$`));
  assert.equal((await api("GET", `/v1/lora/openclaw/${user}`)).json.latest_version, 1);
  const next = await api("POST", "/v1/chat/completions", { model: `openclaw/${user}`, messages, max_tokens: 4 });
  assert.equal(next.json.claas.adapter_version, 1);
});

test("/feedback explains what it needs, and reports the server's errors", async () => {
  const claas = host({ apiUrl: URL, apiKey: KEY, turnsFile: join(mkdtempSync(join(tmpdir(), "claas-")), "turns.json") });
  const ctx = { senderId: "nobody-yet", channel: "telegram", isAuthorizedSender: true };
  assert.match((await claas.command({ ...ctx, args: "  " })).text, /^Usage: \/feedback/);
  assert.match((await claas.command({ ...ctx, args: "shorter" })).text, /no answer of mine/);

  await claas.hooks.get("agent_end")!({ success: true, messages: [{ role: "assistant", content: [], responseId: "chatcmpl-unknown" }] }, ctx);
  assert.match((await claas.command({ ...ctx, args: "shorter" })).text, /^Feedback failed \(HTTP 404\): completion 'chatcmpl-unknown' is not known/);

  const intruder = host({ apiUrl: URL, apiKey: "sk-wrong-key-wrong-key", turnsFile: join(mkdtempSync(join(tmpdir(), "claas-")), "turns.json") });
  assert.equal(await intruder.hooks.get("before_model_resolve")!({ prompt: "hi" }, ctx), undefined); // the configured model answers
  await intruder.hooks.get("agent_end")!({ success: true, messages: [{ role: "assistant", content: [], responseId: "chatcmpl-x" }] }, ctx);
  assert.match((await intruder.command({ ...ctx, args: "shorter" })).text, /^Feedback failed \(HTTP 401\): Missing or invalid API key/);
});
