#!/usr/bin/env bash
# Point an OpenClaw install at claas-ray: this plugin, claas-ray as the OpenAI-compatible model provider
# (model = the user's adapter, chosen per user by the plugin), and an agent prompt small enough for a
# small model's context. Needs `openclaw` on PATH. Used by the README, the compose profile `openclaw` and
# the tests, so all three configure OpenClaw the same way.
#   CLAAS_URL=http://127.0.0.1:8000 CLAAS_API_KEY=sk-claas-... bash plugins/openclaw-claas/configure-openclaw.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${CLAAS_URL:?the claas-ray base URL, e.g. http://127.0.0.1:8000}"
: "${CLAAS_API_KEY:?a claas-ray key of the tenant that owns openclaw/...}"
model=${CLAAS_MODEL:-smollm2-135m}           # the base model's served name
context=${CLAAS_CONTEXT_WINDOW:-8192}        # at most the server's model.max_model_len (configs/local.yaml: 8192)
# Answers are capped: OpenClaw sends no limit of its own, so the server would generate all the context left,
# minutes of decoding for a small model on a CPU. Not for memory: a step takes a whole conversation up to the
# model's context. The provider-level cap applies to the per-user adapter ids too (they are not in the models list).
max_tokens=${CLAAS_MAX_TOKENS:-64}
# How long `/feedback` waits for the step's outcome: a step on an agent's long context takes minutes on a CPU.
wait_seconds=${CLAAS_FEEDBACK_WAIT_SECONDS:-300}

openclaw plugins install --link --force --accept-capabilities "$here" >/dev/null
# One validated write (objects merge, arrays replace).
openclaw config patch --stdin >/dev/null <<JSON
{
  models: {providers: {claas: {
    baseUrl: "$CLAAS_URL/v1", apiKey: "$CLAAS_API_KEY", api: "openai-completions",
    maxTokens: $max_tokens, timeoutSeconds: 600,
    models: [{id: "$model", name: "$model on claas-ray", reasoning: false, input: ["text"],
              cost: {input: 0, output: 0, cacheRead: 0, cacheWrite: 0},
              contextWindow: $context, maxTokens: $max_tokens,
              compat: {supportsTools: false, requiresStringContent: true}}],
  }}},
  agents: {defaults: {
    model: {primary: "claas/$model"},
    // A small model's context: short bootstrap files, the lean local-model prompt.
    experimental: {localModelLean: true},
    bootstrapMaxChars: 400, bootstrapTotalMaxChars: 1200,
  }},
  plugins: {entries: {claas: {
    config: {apiUrl: "$CLAAS_URL", apiKey: "$CLAAS_API_KEY", adapterId: "openclaw/{user}", batchSize: 1,
             waitSeconds: $wait_seconds},
    hooks: {allowConversationAccess: true},   // agent_end and model routing see the turn
  }}},
  tools: {profile: "minimal", toolSearch: false},   // no tool schemas beyond the minimum
  skills: {allowBundled: []},                       // no bundled skills in the prompt
  update: {checkOnStart: false},
}
JSON
# A fresh home (a container, the tests) runs its gateway here; an onboarded install keeps its own mode.
if ! openclaw config get gateway.mode >/dev/null 2>&1; then
  openclaw config set gateway.mode local >/dev/null
fi
echo "OpenClaw now answers with claas-ray at $CLAAS_URL (adapters openclaw/<user>); /feedback <text> trains them."
