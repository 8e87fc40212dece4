/**
 * The one error model at the edge: a wire code from a closed union, an HTTP status, and a
 * message safe for the client. Domain errors are mapped to it in error-handler.ts.
 */
export type ErrorCode =
  | 'invalid_request'
  | 'invalid_token'
  | 'forbidden'
  | 'not_found'
  | 'method_not_allowed'
  | 'conflict'
  | 'precondition_failed'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'unprocessable'
  | 'misdirected'
  | 'unavailable'
  | 'internal';

export class ServiceError extends Error {
  readonly status: number;
  readonly code: ErrorCode;
  /** For logs only, never sent to the client. */
  readonly detail: string | undefined;
  /** Extra JSON for the client (safe: field names, problem lists). */
  readonly body: Record<string, unknown> | undefined;
  /**
   * Sent as Retry-After: the refusal is expected and temporary (the server is busy), logged as a
   * warning rather than a failure.
   */
  readonly retryAfterSeconds: number | undefined;
  constructor(
    status: number,
    code: ErrorCode,
    message: string,
    opts: {
      detail?: string;
      body?: Record<string, unknown>;
      cause?: unknown;
      retryAfterSeconds?: number;
    } = {},
  ) {
    super(message, { cause: opts.cause });
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.detail = opts.detail;
    this.body = opts.body;
    this.retryAfterSeconds = opts.retryAfterSeconds;
  }
}

export const badRequest = (message: string, field?: string) =>
  new ServiceError(400, 'invalid_request', message, field ? { body: { field } } : {});
export const notFound = (what: string) => new ServiceError(404, 'not_found', `${what} not found`);
export const unsupportedMediaType = (expected: string) =>
  new ServiceError(415, 'unsupported_media_type', `Content-Type must be ${expected}`);
