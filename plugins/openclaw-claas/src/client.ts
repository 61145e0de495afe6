/**
 * The claas-ray API as this plugin uses it: create an adapter, send feedback by completion id.
 * Errors come back as `ClaasError` carrying the server's own message (OpenAI's error shape).
 */

export interface FeedbackOutcome {
  status: "queued" | "training" | "applied" | "rejected" | "mixed";
  version: number | null;
  reason: string | null;
}

export class ClaasError extends Error {
  readonly status: number;

  constructor(status: number, message: string) {
    super(message);
    this.status = status;
  }
}

export class ClaasClient {
  readonly baseUrl: string;
  readonly #apiKey: string | undefined;
  readonly #timeoutMs: number;

  constructor(baseUrl: string, apiKey?: string, timeoutMs = 60_000) {
    this.baseUrl = baseUrl.replace(/\/+$/, "").replace(/\/v1$/, "");
    this.#apiKey = apiKey;
    this.#timeoutMs = timeoutMs;
  }

  async #call(method: string, path: string, body?: unknown, timeoutMs = this.#timeoutMs): Promise<{ status: number; json: any }> {
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (this.#apiKey) headers.authorization = `Bearer ${this.#apiKey}`;
    let response: Response;
    try {
      response = await fetch(`${this.baseUrl}${path}`, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (error) {
      throw new ClaasError(0, `claas-ray is not reachable at ${this.baseUrl}: ${(error as Error).message}`);
    }
    const text = await response.text();
    let json: any = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = null;
    }
    return { status: response.status, json: json ?? { error: { message: text.slice(0, 300) } } };
  }

  static #message(json: any, status: number): string {
    return json?.error?.message ?? `HTTP ${status}`;
  }

  /** Version 0 of a new adapter; an adapter that exists already is fine (first use creates it). */
  async ensureAdapter(adapterId: string): Promise<void> {
    const { status, json } = await this.#call("POST", "/v1/lora/init", { lora_id: adapterId });
    if (status !== 201 && status !== 409) throw new ClaasError(status, ClaasClient.#message(json, status));
  }

  /** Feedback on served answers, by their completion ids; waits up to `waitSeconds` for the step's outcome. */
  async feedback(completionIds: string[], feedback: string, waitSeconds = 300): Promise<FeedbackOutcome> {
    const items = completionIds.map((completion_id) => ({ completion_id, feedback }));
    const body = { items, wait: true, wait_timeout_s: waitSeconds };
    const { status, json } = await this.#call("POST", "/v1/feedback", body, (waitSeconds + 30) * 1000);
    if (status !== 200 && status !== 202) throw new ClaasError(status, ClaasClient.#message(json, status));
    const last = json.items[json.items.length - 1];
    const reasons = json.items.map((item: any) => item.reason).filter(Boolean);
    return { status: json.status, version: last.version ?? null, reason: reasons[0] ?? null };
  }
}
