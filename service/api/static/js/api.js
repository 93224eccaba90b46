// The REST API with the session's bearer token. The token lives in sessionStorage only (gone
// when the tab closes), is sent only in the Authorization header to this origin, never in a URL.

const KEY = "lorapool.token";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = error?.code;
    this.param = error?.param;
  }
}

function headers(extra = {}) {
  const t = token.get();
  return t ? { Authorization: `Bearer ${t}`, ...extra } : extra;
}

async function check(resp) {
  if (resp.ok) return resp;
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON: keep the status */ }
  const err = new ApiError(resp.status, body?.error);
  if (resp.status === 401) window.dispatchEvent(new CustomEvent("lorapool:unauthorized"));
  throw err;
}

export async function get(path, params) {
  const url = params ? `${path}?${new URLSearchParams(params)}` : path;
  const resp = await fetch(url, { headers: headers(), cache: "no-store" });
  return (await check(resp)).json();
}

export async function post(path, body) {
  const isForm = body instanceof FormData;
  const resp = await fetch(path, {
    method: "POST",
    headers: headers(isForm ? {} : { "Content-Type": "application/json" }),
    body: isForm ? body : JSON.stringify(body),
  });
  return (await check(resp)).json();
}

/** Download an authenticated file (the header cannot ride on a plain link). */
export async function download(path, filename) {
  const resp = await check(await fetch(path, { headers: headers() }));
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/**
 * Follow a server-sent event stream with fetch (EventSource cannot send an Authorization
 * header). Calls onEvent(parsedData, eventName) per event; resolves when the server ends the
 * stream, rejects on an HTTP error; `signal` aborts it.
 */
export async function stream(path, onEvent, signal) {
  const resp = await check(await fetch(path, {
    headers: headers({ Accept: "text/event-stream" }), signal, cache: "no-store",
  }));
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // Events end with a blank line; a line ends with \n, \r\n or \r (the SSE grammar).
    const parts = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = parts.pop();
    for (const block of parts) dispatch(block, onEvent);
  }
  if (buffer.trim()) dispatch(buffer, onEvent);
}

function dispatch(block, onEvent) {
  let name = "message";
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (!line || line.startsWith(":")) continue; // comment / keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let val = colon < 0 ? "" : line.slice(colon + 1);
    if (val.startsWith(" ")) val = val.slice(1);
    if (field === "event") name = val;
    else if (field === "data") data.push(val);
  }
  if (!data.length) return;
  let parsed;
  try { parsed = JSON.parse(data.join("\n")); } catch { return; }
  onEvent(parsed, name);
}
