/**
 * The one error model at the edge: a wire code from a closed union, an HTTP status, and a
 * message safe for the client. Domain errors are mapped to it in error-handler.ts.
 */
import type { ErrorRequestHandler } from 'express';

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

/**
 * An error handler for a body parser with `limitBytes`: a body over it becomes 413
 * `payload_too_large` with `message` (naming the limit and what to do) and `limitBytes` in the
 * body; any other error goes on unchanged.
 */
export function bodyTooLarge(message: string, limitBytes: number): ErrorRequestHandler {
  return (err: unknown, _req, _res, next) => {
    const tooLarge = (err as { type?: unknown } | null)?.type === 'entity.too.large';
    next(
      tooLarge
        ? new ServiceError(413, 'payload_too_large', message, { body: { limitBytes }, cause: err })
        : err,
    );
  };
}
