// JSON calls to cellcds with a bearer token. Errors carry the server's safe message and status.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls `url` (same origin); `token` goes only into the Authorization header. */
export async function callJson(url, { method = 'GET', token, body } = {}) {
  const headers = { accept: 'application/json' };
  if (token) {
    headers.authorization = `Bearer ${token}`;
  }
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
  }
  const res = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'omit',
    cache: 'no-store',
  });
  const text = await res.text();
  let data;
  try {
    data = text === '' ? undefined : JSON.parse(text);
  } catch {
    data = undefined;
  }
  if (!res.ok) {
    const code = data && typeof data.error === 'string' ? data.error : 'error';
    const message = data && typeof data.message === 'string' ? data.message : `HTTP ${res.status}`;
    throw new ApiError(res.status, code, message);
  }
  return data;
}

/** Pretty JSON for display. */
export function pretty(value) {
  return JSON.stringify(value, null, 2);
}
