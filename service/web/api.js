// The API client of the page. The token lives in sessionStorage (this tab only, gone when it
// closes) and travels only as an `Authorization: Bearer` header; it is never put in a URL, and
// no cookie is used (`credentials: "omit"`), so a write cannot be forged from another site.

const TOKEN_KEY = "visionloop.apiToken";

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set(token) { sessionStorage.setItem(TOKEN_KEY, token); },
  clear() { sessionStorage.removeItem(TOKEN_KEY); },
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  // "code: message" as the API said it, for showing next to what failed.
  get text() { return this.code ? `${this.code}: ${this.message}` : this.message; }
}

function headers(token, extra = {}) {
  const out = { ...extra };
  if (token) out.Authorization = `Bearer ${token}`;
  return out;
}

async function errorOf(response) {
  let code = `http_${response.status}`, message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, code, message);
}

// fetch `path` on this origin -> parsed JSON (or the Response with `raw`); throws ApiError with
// the API's code and message, or code "network" when no answer came.
export async function api(path, { method = "GET", json, form, token = session.token, raw = false, signal } = {}) {
  const init = { method, headers: headers(token), credentials: "omit", signal, cache: "no-store" };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", "no answer from the service (connection lost or refused)");
  }
  if (!response.ok) throw await errorOf(response);
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// An image that needs the token (review images, thumbnails) -> an object URL for <img src>.
// The caller revokes it (URL.revokeObjectURL) when the image goes.
export async function imageURL(path) {
  const response = await api(path, { raw: true });
  return URL.createObjectURL(await response.blob());
}

// Save what `path` answers as a file named `filename` (weights download with the token).
export async function download(path, filename) {
  const response = await api(path, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Follow a training job's server-sent events (GET /v1/train/{id}/events). EventSource cannot
// send a header, so the stream is read with fetch. `onJob(view)` gets every job view;
// `onState(state, detail)` gets "connecting", "live", "reconnecting" (the connection dropped:
// it retries with back-off, up to 10 s apart, and the first event after it is the current
// state), "ended" (the job finished) or "error" (the API refused: unknown job, bad token).
// -> a function that stops following.
export function followJob(jobId, { onJob, onState }) {
  let stopped = false;
  let controller = null;
  const path = `/v1/train/${encodeURIComponent(jobId)}/events`;
  (async () => {
    let delay = 500;
    let first = true;
    while (!stopped) {
      onState(first ? "connecting" : "reconnecting");
      first = false;
      controller = new AbortController();
      try {
        const response = await fetch(path, {
          headers: headers(session.token, { Accept: "text/event-stream" }),
          credentials: "omit", cache: "no-store", signal: controller.signal,
        });
        if (!response.ok) {
          const err = await errorOf(response);
          if (response.status >= 400 && response.status < 500 && response.status !== 408 && response.status !== 429) {
            onState("error", err.text);
            return;
          }
          throw err;
        }
        onState("live");
        delay = 500;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replace(/\r\n?/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let event = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) event = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (!data.length) continue;
            if (event === "job") onJob(JSON.parse(data.join("\n")));
            else if (event === "end") {
              stopped = true;
              onState("ended");
              return;
            }
          }
        }
      } catch (err) {
        if (stopped) return;
      }
      if (stopped) return;
      onState("reconnecting");
      await sleep(delay);
      delay = Math.min(delay * 2, 10_000);
    }
  })();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}
