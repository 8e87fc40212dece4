/**
 * The one mapper from thrown errors to HTTP responses. Domain folders throw their own typed
 * errors; this is the only place that knows their HTTP status. Unknown errors become a 500
 * with a correlation id; the cause goes to the (redacted) log, never to the client.
 */
import type { ErrorRequestHandler, RequestHandler } from 'express';
import { HookRequestError, PrefetchError } from '../hooks/index.ts';
import { PackValidationError, UnknownServiceError } from '../rules/index.ts';
import {
  AdminAuthError,
  AuthError,
  BackupError,
  KeyUnavailableError,
  RecordOpenError,
  ConflictError,
  ForbiddenError,
  InvalidInputError,
  isStoreUnavailableError,
  NotFoundError,
  StoreBusyError,
  RegionMismatchError,
  ResidencyError,
  RETRYABLE_AUTH_FAILURES,
} from '../tenants/index.ts';
import { ServiceError } from './errors.ts';
import type { Logger } from './logger.ts';

/** Retry-After of a call to a tenant whose store is being restored or deprovisioned here. */
const STORE_BUSY_RETRY_AFTER_SECONDS = 10;
/** Retry-After of a token refused because the replay cache's backend cannot be trusted or is full. */
export const AUTH_RETRY_AFTER_SECONDS = 5;

/** Maps any thrown value to a ServiceError (or passes one through). */
export function toServiceError(err: unknown): ServiceError {
  if (err instanceof ServiceError) {
    return err;
  }
  if (err instanceof AuthError && RETRYABLE_AUTH_FAILURES.has(err.reason)) {
    // The replay cache's backend is down or may evict keys, or the whole cache is full: the
    // token may be valid, so the client is told to retry (503 + Retry-After, with a new token),
    // not that its token is bad. Still refused.
    return new ServiceError(503, 'unavailable', 'service unavailable, retry later', {
      detail: err.reason,
      cause: err,
    });
  }
  if (err instanceof AuthError) {
    // Never tell the client why: the reason goes to the audit log and metrics.
    return new ServiceError(401, 'invalid_token', 'invalid token', {
      detail: err.reason,
      cause: err,
    });
  }
  if (err instanceof AdminAuthError) {
    return new ServiceError(401, 'invalid_token', 'invalid token', {
      detail: err.message,
      cause: err,
    });
  }
  if (err instanceof ForbiddenError && err.hiddenAs !== undefined) {
    return new ServiceError(404, 'not_found', `${err.hiddenAs} not found`, {
      detail: err.message,
      cause: err,
    });
  }
  if (err instanceof ForbiddenError) {
    // The policy's own words (a role and an action, e.g. "role platform-operator may not
    // records:read"): tells the caller which token it needs, names no data.
    return new ServiceError(403, 'forbidden', err.message, { detail: err.message, cause: err });
  }
  if (err instanceof NotFoundError) {
    return new ServiceError(404, 'not_found', err.message, { cause: err });
  }
  if (err instanceof StoreBusyError) {
    // Being restored (tens of seconds) or deprovisioned on this process: an EHR's call or an
    // operator's read comes back shortly (a deprovisioned tenant then gets its own answer).
    return new ServiceError(503, 'unavailable', err.message, {
      cause: err,
      retryAfterSeconds: STORE_BUSY_RETRY_AFTER_SECONDS,
    });
  }
  if (err instanceof ConflictError) {
    return new ServiceError(409, 'conflict', err.message, { cause: err });
  }
  if (err instanceof InvalidInputError) {
    return new ServiceError(400, 'invalid_request', err.message, {
      body: { field: err.field },
      cause: err,
    });
  }
  if (err instanceof HookRequestError) {
    return new ServiceError(400, 'invalid_request', err.message, {
      body: { field: err.field },
      cause: err,
    });
  }
  if (err instanceof UnknownServiceError) {
    return new ServiceError(404, 'not_found', 'no such CDS service', { cause: err });
  }
  if (err instanceof PackValidationError) {
    return new ServiceError(422, 'unprocessable', err.message, {
      body: { problems: err.problems },
      cause: err,
    });
  }
  if (err instanceof PrefetchError) {
    return new ServiceError(412, 'precondition_failed', err.message, {
      detail: `prefetch ${err.key}: ${err.reason}`,
      cause: err,
    });
  }
  if (err instanceof ResidencyError) {
    return new ServiceError(422, 'unprocessable', 'the residency policy forbids this', {
      body: { problems: err.problems },
      cause: err,
    });
  }
  if (err instanceof RegionMismatchError) {
    return new ServiceError(421, 'misdirected', 'this region does not serve this tenant', {
      cause: err,
    });
  }
  if (err instanceof KeyUnavailableError && err.reason === 'wrap_limit') {
    // The tenant's DEK reached its hard wrap limit and no rotation has replaced it yet: the
    // write is refused (fail closed) and retryable once the rotation made a new version.
    return new ServiceError(503, 'unavailable', 'tenant data key exhausted, retry later', {
      detail: 'key: wrap_limit',
      cause: err,
    });
  }
  if (err instanceof KeyUnavailableError && err.reason === 'tenant_key_destroyed') {
    // The tenant's key in this region was destroyed (its data here crypto-shredded) while it is
    // still registered (a standby shredded, then a failover to it): no retry will help, and it is
    // no server fault. An operator ends it (clear the failover, or deprovision the tenant).
    return new ServiceError(
      409,
      'conflict',
      "the tenant's key was destroyed in this region (its data here was crypto-shredded); an operator must clear the failover or deprovision the tenant",
      { detail: 'key: tenant_key_destroyed', cause: err },
    );
  }
  if (err instanceof KeyUnavailableError && err.reason === 'tenant_key_missing') {
    // The tenant's store exists but this replica's key provider holds neither its key nor a
    // tombstone: a deployment fault of this replica (an older copy of the region's keyring, as
    // another keyring is refused at boot), not a shred and not the client's. 503: another replica, or this one once its
    // keyring is fixed, serves the call; no Retry-After (no wait fixes it), logged at error.
    return new ServiceError(
      503,
      'unavailable',
      "this replica's keyring does not hold the tenant's key: is it an older copy of the region's keyring? Every replica must share the region's one keyring (keyProvider.dir) or KMS",
      { detail: 'key: tenant_key_missing', cause: err },
    );
  }
  if (err instanceof KeyUnavailableError) {
    // The region's key provider is down: retryable. Any other key failure is a server fault.
    return err.reason === 'provider'
      ? new ServiceError(503, 'unavailable', 'key provider unavailable', {
          detail: err.message,
          cause: err,
        })
      : new ServiceError(500, 'internal', 'internal error', {
          detail: `key: ${err.reason}`,
          cause: err,
        });
  }
  if (err instanceof RecordOpenError) {
    return new ServiceError(500, 'internal', 'internal error', {
      detail: `record: ${err.reason}`,
      cause: err,
    });
  }
  if (err instanceof BackupError) {
    // The reason is a closed set of codes (e.g. `manifest_signature`), for scripts to act on.
    return new ServiceError(422, 'unprocessable', err.message, {
      detail: err.reason,
      body: { reason: err.reason },
      cause: err,
    });
  }
  if (err instanceof Error && isStoreUnavailableError(err)) {
    // Retryable: the region's database refused, lost or did not hand out a connection in
    // time, or a statement or lock wait hit its timeout. The class only, in the log detail
    // (a driver message can name the host).
    return new ServiceError(503, 'unavailable', 'data store unavailable', {
      detail: `store: ${err.name}`,
      cause: err,
    });
  }
  if (isBodyParserError(err)) {
    if (err.type === 'entity.too.large') {
      return new ServiceError(413, 'payload_too_large', 'request body is too large', {
        cause: err,
      });
    }
    if (err.type === 'encoding.unsupported' || err.type === 'charset.unsupported') {
      return new ServiceError(415, 'unsupported_media_type', 'unsupported body encoding', {
        cause: err,
      });
    }
    return new ServiceError(400, 'invalid_request', 'request body is not valid JSON', {
      cause: err,
    });
  }
  return new ServiceError(500, 'internal', 'internal error', { cause: err });
}

function isBodyParserError(err: unknown): err is Error & { type: string; status: number } {
  return (
    err instanceof Error &&
    typeof (err as { type?: unknown }).type === 'string' &&
    typeof (err as { status?: unknown }).status === 'number'
  );
}

/** Express error middleware. */
export function errorHandler(log: Logger): ErrorRequestHandler {
  return (err, req, res, next) => {
    if (res.headersSent) {
      next(err);
      return;
    }
    const se = toServiceError(err);
    const requestId = (res.locals as { requestId?: string }).requestId;
    const tenant = (res.locals as { ctx?: { tenant?: { id: string } } }).ctx?.tenant?.id;
    const logFields = {
      requestId,
      tenant,
      ...adminFields(res.locals as AdminLocals),
      method: req.method,
      route: routeOf(req, res),
      status: se.status,
      code: se.code,
    };
    if (err instanceof AuthError && se.status === 503) {
      // A refused token (the backend's state is logged once per change, not per request).
      log.info({ ...logFields, reason: se.detail }, 'request refused');
    } else if (se.retryAfterSeconds !== undefined) {
      log.warn({ ...logFields, reason: se.detail }, 'request refused: busy');
    } else if (se.status >= 500) {
      log.error(
        {
          ...logFields,
          ...(se.detail !== undefined ? { reason: se.detail } : {}),
          err: redactableError(err),
        },
        'request failed',
      );
    } else {
      log.info({ ...logFields, reason: se.detail }, 'request refused');
    }
    if (se.status === 401) {
      res.setHeader('WWW-Authenticate', 'Bearer');
    }
    if (err instanceof AuthError && se.status === 503) {
      res.setHeader('Retry-After', String(AUTH_RETRY_AFTER_SECONDS));
    } else if (se.retryAfterSeconds !== undefined) {
      res.setHeader('Retry-After', String(se.retryAfterSeconds));
    }
    if (err instanceof PrefetchError) {
      // CDS Hooks: 412 with an OperationOutcome body (3.0 makes this a SHOULD; harmless in 2.0).
      res.status(412).type('application/json').json(err.operationOutcome);
      return;
    }
    const body: Record<string, unknown> = { error: se.code, message: se.message, ...se.body };
    if (se.status >= 500 && requestId) {
      body.requestId = requestId;
    }
    res.status(se.status).json(body);
  };
}

/** What the admin API keeps in `res.locals` that a refusal's log line names. */
interface AdminLocals {
  /** Set once the operator token is verified (server/context.ts AdminCtx). */
  admin?: { principal?: { tokenId?: string; role?: string; tenant?: string } };
  /** Set by the admin API on a refused access (403): the tenant the request was aimed at. */
  adminRefusal?: { targetTenant?: string };
}

/**
 * An admin request's principal (the token id, never the token), its role and own tenant, and
 * the tenant a refused access was aimed at: a 403's line says who tried what on whom.
 */
function adminFields(locals: AdminLocals): Record<string, string> {
  const p = locals.admin?.principal;
  const target = locals.adminRefusal?.targetTenant;
  return {
    ...(p?.tokenId !== undefined ? { principal: p.tokenId } : {}),
    ...(p?.role !== undefined ? { role: p.role } : {}),
    ...(p?.tenant !== undefined ? { principalTenant: p.tenant } : {}),
    ...(target !== undefined ? { targetTenant: target } : {}),
  };
}

/** Keeps an error's name, message and stack (stack text passes through pino's redaction). */
function redactableError(err: unknown): Record<string, unknown> {
  if (err instanceof Error) {
    return { type: err.name, message: err.message, stack: err.stack };
  }
  return { type: typeof err };
}

/** Where {@link recordRoutePattern} keeps the request's full route pattern. */
interface RouteLocals {
  routePattern?: string;
}

/**
 * Keeps the full route pattern (mount prefix + route path, e.g. `/cds-services/:id`) in
 * `res.locals` as a router matches it. The error handler runs at the app's level, where Express
 * has restored `req.baseUrl` (to `''`) on the way out of the mounted router: on its own it would
 * log `/:id` for every hook call. Install it first, before the routers.
 */
export const recordRoutePattern: RequestHandler = (req, res, next) => {
  let route: unknown = (req as { route?: unknown }).route;
  Object.defineProperty(req, 'route', {
    configurable: true,
    enumerable: true,
    get: () => route,
    set: (value: unknown) => {
      route = value;
      const p = (value as { path?: unknown } | undefined)?.path;
      if (typeof p === 'string') {
        (res.locals as RouteLocals).routePattern = `${req.baseUrl}${p}`;
      }
    },
  });
  next();
};

/**
 * Records the route pattern of a request that no route has matched yet (the admin API names the
 * route it resolved for a token it refuses before routing), for the refusal's log line.
 */
export function noteRoutePattern(res: { locals: unknown }, pattern: string): void {
  const locals = res.locals as RouteLocals;
  locals.routePattern ??= pattern;
}

/** The route pattern recorded for this request (see {@link recordRoutePattern}), if any. */
export function routePatternOf(res: { locals: unknown }): string | undefined {
  return (res.locals as RouteLocals).routePattern;
}

function routeOf(
  req: { baseUrl: string; route?: { path?: unknown } },
  res: { locals: unknown },
): string {
  const recorded = (res.locals as RouteLocals).routePattern;
  if (recorded !== undefined) {
    return recorded;
  }
  const p = req.route?.path;
  return `${req.baseUrl}${typeof p === 'string' ? p : ''}`;
}

/** 404 for anything no route matched. */
export const notFoundHandler: RequestHandler = (_req, _res, next) => {
  next(new ServiceError(404, 'not_found', 'no such endpoint'));
};
