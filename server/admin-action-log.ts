/**
 * One `admin action` log line (info) per state-changing admin API call, for on-call
 * correlation. The control-plane and tenant audit trails stay the record of what was done; this
 * line ties a request id to an action, a tenant and a principal in the process log.
 *
 * A line carries `action` (the audit event type where there is one, e.g. `admin.tenant.create`,
 * `key.rotate`), `tenant` (only if it is a well-formed tenant id), `principal` (the token id:
 * `bootstrap` or `tok_...`, never the token) and its `role`, `outcome` (`success`, `refused`
 * for a 4xx, `failed` for a 5xx), the HTTP `status` and the `requestId`, plus a few ids the
 * route adds (job, pack and version, token id). No request body, no PHI, no secret.
 */
import type { ErrorRequestHandler, Request, RequestHandler, Response } from 'express';
import { TENANT_ID_PATTERN } from '../tenants/index.ts';
import type { AdminCtx } from './context.ts';
import { requestIdOf } from './context.ts';
import { toServiceError } from './error-handler.ts';
import type { Logger } from './logger.ts';

/** How an admin action ended: 2xx/3xx success, 4xx refused, 5xx failed. */
export type AdminActionOutcome = 'success' | 'refused' | 'failed';

/** Reads the target tenant of a request (its body is parsed by then, if it could be). */
export type TenantOf = (req: Request, params: Readonly<Record<string, string>>) => unknown;

/** Ids a route adds to its line (a job, a pack and version, a token id): never payloads. */
export type AdminActionFields = Readonly<Record<string, string | number | boolean>>;

/** The action of the request being served (res.locals), until its line is written. */
interface PendingAction {
  action: string;
  tenantOf: TenantOf;
  req: Request;
  /** The route's parameters as matched (Express resets `req.params` on the way out). */
  params: Readonly<Record<string, string>>;
  logged: boolean;
}

export interface AdminActionLog {
  /**
   * Route middleware, first in the route's chain (before its body parser, so that a refused
   * body is logged too): names the action; `tenantOf` reads the target tenant from the request
   * when the line is written (default: the `:id` route parameter).
   */
  mark: (action: string, tenantOf?: TenantOf) => RequestHandler;
  /** Logs the action's success (call it after the answer is set); later calls do nothing. */
  done: (res: Response, fields?: AdminActionFields) => void;
  /**
   * Router error middleware, after the routes: logs the action an error ended (`refused` or
   * `failed`, by the status the error maps to), then passes the error on unchanged.
   */
  errors: ErrorRequestHandler;
}

const paramId: TenantOf = (_req, params) => params.id;

function outcomeOf(status: number): AdminActionOutcome {
  if (status >= 500) {
    return 'failed';
  }
  return status >= 400 ? 'refused' : 'success';
}

/** Creates the admin action log of an app, writing to `log`. */
export function adminActionLog(log: Logger): AdminActionLog {
  const pendingOf = (res: Response): PendingAction | undefined =>
    (res.locals as { adminAction?: PendingAction }).adminAction;

  const write = (res: Response, status: number, fields: AdminActionFields = {}): void => {
    const pending = pendingOf(res);
    const ctx = (res.locals as { admin?: AdminCtx }).admin;
    if (!pending || pending.logged || !ctx) {
      return;
    }
    pending.logged = true;
    let tenant: unknown;
    try {
      tenant = pending.tenantOf(pending.req, pending.params);
    } catch {
      tenant = undefined;
    }
    log.info(
      {
        ...fields,
        requestId: requestIdOf(res),
        action: pending.action,
        ...(typeof tenant === 'string' && TENANT_ID_PATTERN.test(tenant) ? { tenant } : {}),
        principal: ctx.principal.tokenId,
        role: ctx.principal.role,
        outcome: outcomeOf(status),
        status,
      },
      'admin action',
    );
  };

  return {
    mark: (action, tenantOf = paramId) => {
      return (req, res, next) => {
        (res.locals as { adminAction?: PendingAction }).adminAction = {
          action,
          tenantOf,
          req,
          params: { ...(req.params as Record<string, string>) },
          logged: false,
        };
        // A route that answered without `done` (or an error that bypassed `errors`): logged
        // by its final status once the answer is out.
        res.once('finish', () => {
          write(res, res.statusCode);
        });
        next();
      };
    },
    done: (res, fields) => {
      write(res, res.statusCode, fields);
    },
    errors: (err: unknown, _req, res, next) => {
      write(res, toServiceError(err).status);
      next(err);
    },
  };
}
