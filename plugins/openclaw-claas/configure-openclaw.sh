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
context=${CLAAS_CONTEXT_WINDOW:-4096}        # the server's model.max_model_len
max_tokens=${CLAAS_MAX_TOKENS:-64}

set_json() { openclaw config set "$1" "$2" --strict-json >/dev/null; }

openclaw plugins install --link --force --accept-capabilities "$here" >/dev/null
set_json models.providers.claas "$(printf '{"baseUrl": "%s/v1", "apiKey": "%s", "api": "openai-completions", "timeoutSeconds": 600, "models": [{"id": "%s", "name": "%s on claas-ray", "reasoning": false, "input": ["text"], "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0}, "contextWindow": %d, "maxTokens": %d, "compat": {"supportsTools": false, "requiresStringContent": true}}]}' \
  "$CLAAS_URL" "$CLAAS_API_KEY" "$model" "$model" "$context" "$max_tokens")"
set_json agents.defaults.model.primary "\"claas/$model\""
set_json plugins.entries.claas.config "$(printf '{"apiUrl": "%s", "apiKey": "%s", "adapterId": "openclaw/{user}", "batchSize": 1}' "$CLAAS_URL" "$CLAAS_API_KEY")"
set_json plugins.entries.claas.hooks.allowConversationAccess true   # agent_end and model routing see the turn
# A small model's context: no tool schemas, no bundled skills, short bootstrap files.
set_json agents.defaults.experimental.localModelLean true
set_json tools.profile '"minimal"'
set_json tools.toolSearch false
set_json skills.allowBundled '[]'
set_json agents.defaults.bootstrapMaxChars 400
set_json agents.defaults.bootstrapTotalMaxChars 1200
set_json update.checkOnStart false
echo "OpenClaw now answers with claas-ray at $CLAAS_URL (adapters openclaw/<user>); /feedback <text> trains them."
