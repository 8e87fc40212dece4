/**
 * The admin API (JSON in and out). Every route needs an operator bearer token; what each
 * role may do is decided by tenants/' authorize(), called inside AdminService.
 *
 * Refusals are audited in the control plane, within the refusal audit budget per second
 * (server/failure-audit.ts): a refused token as `admin.auth` (failure: reason, method, route
 * pattern, request id), a refused access as `admin.forbidden` (actor, the action refused, the
 * target tenant, method, route pattern, request id). A token is checked on arrival and again
 * once a request body is read, before the action runs.
 */
import crypto from 'node:crypto';
import express, {
  type ErrorRequestHandler,
  type Request,
  type RequestHandler,
  type Router,
} from 'express';
import {
  ADMIN_ACTIONS,
  AdminAuthError,
  ForbiddenError,
  TENANT_ID_PATTERN,
} from '../tenants/index.ts';
import type { AdminTokenRefusal, AuditEvent, Principal } from '../tenants/index.ts';
import { adminActionLog } from './admin-action-log.ts';
import { actorOf } from './admin-service.ts';
import type { AdminService } from './admin-service.ts';
import { anchorsOfQuery, controlPlaneAuditHead, verifyControlPlaneAudit } from './audit-anchors.ts';
import type { DataAdmin } from './data-admin.ts';
import type { Deps } from './context.ts';
import { adminCtxOf, requestIdOf } from './context.ts';
import { noteRoutePattern, routePatternOf } from './error-handler.ts';
import { bodyTooLarge, ServiceError, unsupportedMediaType } from './errors.ts';
import { auditRefusal } from './guards.ts';

/**
 * Largest pack upload body, JSON or YAML (docs/authoring-packs.md): 4 times the shipped pack as
 * `pack push` sends it (1.0 MB, its tests' patient bundles inlined), and what the validation
 * worker's default limits take in YAML too (~14 s, < 512 MB). Larger: 413 naming it.
 */
const PACK_UPLOAD_LIMIT = 4 * 1024 * 1024;
/**
 * Pack uploads a process takes at once (body read, check, tests) are `CELLCDS_PACK_UPLOADS_IN_FLIGHT`
 * (2): each can hold a worker for tens of seconds and a few MB, so more wait in the client
 * (503 + Retry-After; `pack push` retries), not in memory.
 */
const PACK_UPLOAD_RETRY_AFTER_SECONDS = 10;
const YAML_TYPES = ['application/yaml', 'application/x-yaml', 'text/yaml', 'text/x-yaml'];

export function adminRouter(deps: Deps, admin: AdminService, data: DataAdmin): Router {
  const router = express.Router();
  const routes = routeTable(router);
  // A token revoked while the body was on its way is refused before the action runs.
  const stillValid = recheckAdmin(deps);
  const json = series(
    express.json({ limit: '1mb', type: ['application/json', 'application/*+json'] }),
    stillValid,
  );
  // Answers carry one-time tokens and decrypted records: no cache may keep them (refusals too).
  router.use((_req, res, next) => {
    res.setHeader('Cache-Control', 'no-store');
    next();
  });
  router.use(authenticateAdmin(deps, routes));
  // One `admin action` line per state-changing call (server/admin-action-log.ts).
  const actions = adminActionLog(deps.log);
  const act = actions.mark;
  const done = actions.done;
  const bodyField = (name: string) => (req: Request) =>
    ((req.body ?? {}) as Record<string, unknown>)[name];

  router.post('/tenants', act('admin.tenant.create', bodyField('id')), json, async (req, res) => {
    queryOf(req, []);
    res.status(201).json(await admin.createTenant(principalOf(res), bodyOf(req)));
    done(res);
  });
  router.get('/tenants', async (req, res) => {
    queryOf(req, []);
    res.json({ tenants: await admin.listTenants(principalOf(res)) });
  });
  router.get('/tenants/:id', async (req, res) => {
    queryOf(req, []);
    res.json(await admin.getTenant(principalOf(res), param(req, 'id')));
  });
  router.patch('/tenants/:id', act('admin.tenant.update'), json, async (req, res) => {
    queryOf(req, []);
    res.json(await admin.updateTenant(principalOf(res), param(req, 'id'), bodyOf(req)));
    done(res);
  });
  router.post('/tenants/:id/suspend', act('admin.tenant.suspend'), async (req, res) => {
    queryOf(req, []);
    res.json(await admin.setTenantStatus(principalOf(res), param(req, 'id'), 'suspended'));
    done(res);
  });
  router.post('/tenants/:id/resume', act('admin.tenant.resume'), async (req, res) => {
    queryOf(req, []);
    res.json(await admin.setTenantStatus(principalOf(res), param(req, 'id'), 'active'));
    done(res);
  });
  router.post(
    '/tenants/:id/failover',
    act('residency.failover.declared'),
    json,
    async (req, res) => {
      queryOf(req, []);
      const body = (req.body ?? {}) as Record<string, unknown>;
      const tenant = await admin.declareFailover(principalOf(res), param(req, 'id'), body.region);
      res.json(tenant);
      done(res, tenant.failover ? { region: tenant.failover.region } : {});
    },
  );
  router.delete('/tenants/:id/failover', act('residency.failover.cleared'), async (req, res) => {
    queryOf(req, []);
    res.json(await admin.clearFailover(principalOf(res), param(req, 'id')));
    done(res);
  });
  router.put(
    '/tenants/:id/subscriptions',
    act('admin.tenant.subscriptions'),
    json,
    async (req, res) => {
      queryOf(req, []);
      res.json(await admin.setSubscriptions(principalOf(res), param(req, 'id'), bodyOf(req)));
      done(res);
    },
  );

  // One pack's subscription: a rule author rolls out (moves versions of a subscribed pack), a
  // tenant-admin or operator also adds and drops packs.
  router.put(
    '/tenants/:id/subscriptions/:pack',
    act('admin.tenant.subscriptions'),
    json,
    async (req, res) => {
      const pack = param(req, 'pack');
      const only = queryOf(req, ['existingOnly']).existingOnly;
      if (only !== undefined && only !== 'true' && only !== 'false') {
        throw new ServiceError(400, 'invalid_request', 'existingOnly: must be true or false', {
          body: { field: 'existingOnly' },
        });
      }
      res.json(
        await admin.setSubscription(principalOf(res), param(req, 'id'), pack, bodyOf(req), {
          existingOnly: only === 'true',
        }),
      );
      done(res, { pack });
    },
  );
  router.delete(
    '/tenants/:id/subscriptions/:pack',
    act('admin.tenant.subscriptions'),
    async (req, res) => {
      queryOf(req, []);
      const pack = param(req, 'pack');
      res.json(await admin.removeSubscription(principalOf(res), param(req, 'id'), pack));
      done(res, { pack });
    },
  );

  router.post('/tokens', act('admin.token.issue', bodyField('tenant')), json, async (req, res) => {
    queryOf(req, []);
    const issued = await admin.issueToken(principalOf(res), bodyOf(req));
    res.status(201).json(issued);
    done(res, { tokenId: issued.id, tokenRole: issued.role });
  });
  router.get('/tokens', async (req, res) => {
    // `?unusedForDays=N`: the stale ones only. Passed on as given (a repeated parameter is a
    // list, which the service refuses, 400 naming the field).
    const unusedForDays = queryOf(req, ['unusedForDays']).unusedForDays;
    const filter = unusedForDays !== undefined ? { unusedForDays } : {};
    res.json({ tokens: await admin.listTokens(principalOf(res), filter, deps.now()) });
  });
  router.delete(
    '/tokens/:id',
    act('admin.token.revoke', () => undefined),
    async (req, res) => {
      queryOf(req, []);
      const info = await admin.revokeToken(principalOf(res), param(req, 'id'));
      res.status(204).end();
      // The target tenant is the revoked token's (read by the service).
      done(res, {
        tokenId: info.id,
        ...(info.tenant !== undefined ? { tenant: info.tenant } : {}),
      });
    },
  );

  const packBody = express.text({
    limit: PACK_UPLOAD_LIMIT,
    type: [...YAML_TYPES, 'application/json', 'application/*+json'],
  });
  // An upload body over the limit: 413 naming it (other errors go on unchanged).
  const packTooLarge = bodyTooLarge(
    `a rule pack upload may be at most ${PACK_UPLOAD_LIMIT / (1024 * 1024)} MB; split the pack`,
    PACK_UPLOAD_LIMIT,
  );
  let uploadsInFlight = 0;
  // Before the body is read: a refused upload costs no memory.
  const uploadSlot: RequestHandler = (_req, res, next) => {
    const maxUploads = deps.config.packCheck.uploadsInFlight;
    if (uploadsInFlight >= maxUploads) {
      next(
        new ServiceError(
          503,
          'unavailable',
          `${maxUploads} pack upload${maxUploads === 1 ? ' is' : 's are'} already being checked on this server; try again shortly`,
          { detail: 'pack uploads busy', retryAfterSeconds: PACK_UPLOAD_RETRY_AFTER_SECONDS },
        ),
      );
      return;
    }
    uploadsInFlight += 1;
    let released = false;
    const release = (): void => {
      if (!released) {
        released = true;
        uploadsInFlight -= 1;
      }
    };
    res.on('finish', release);
    res.on('close', release);
    next();
  };
  router.post(
    '/rule-packs',
    act('admin.pack.upload', () => undefined),
    uploadSlot,
    packBody,
    stillValid,
    async (req, res) => {
      queryOf(req, []);
      if (!req.is([...YAML_TYPES, 'application/json', 'application/*+json'])) {
        throw unsupportedMediaType('application/json or application/yaml');
      }
      const text = typeof req.body === 'string' ? req.body : '';
      // Parsed in the validation worker, with the rest (a large YAML takes seconds to parse).
      const format = req.is(YAML_TYPES) ? 'yaml' : 'json';
      // Validation and tests take up to tens of seconds: the token must still hold to store.
      const result = await admin.uploadPackText(principalOf(res), text, format, () =>
        recheckToken(deps, req, res),
      );
      res.status(result.status === 'created' ? 201 : 200).json({
        id: result.id,
        version: result.version,
        hash: result.hash,
        ...(result.warnings ? { warnings: result.warnings } : {}),
      });
      done(res, { pack: result.id, version: result.version, packStatus: result.status });
    },
  );
  router.use('/rule-packs', packTooLarge);
  router.get('/rule-packs', async (req, res) => {
    queryOf(req, []);
    res.json({ packs: await admin.listPacks(principalOf(res)) });
  });
  router.get('/rule-packs/:id/subscriptions', async (req, res) => {
    queryOf(req, []);
    res.json({ subscriptions: await admin.packSubscriptions(principalOf(res), param(req, 'id')) });
  });
  router.get('/rule-packs/:id/versions/:version', async (req, res) => {
    queryOf(req, []);
    res.json(await admin.getPack(principalOf(res), param(req, 'id'), param(req, 'version')));
  });

  // ------------------------------------------------------------ data plane (this region)
  router.get('/tenants/:id/invocations', async (req, res) => {
    const q = queryOf(req, ['from', 'to', 'hook', 'limit'], { once: true });
    const limit = typeof q.limit === 'string' ? Number(q.limit) : undefined;
    if (limit !== undefined && (!Number.isInteger(limit) || limit < 1 || limit > 1000)) {
      throw new ServiceError(400, 'invalid_request', 'limit: must be an integer from 1 to 1000', {
        body: { field: 'limit' },
      });
    }
    const invocations = await data.listInvocations(principalOf(res), param(req, 'id'), {
      ...(typeof q.from === 'string' ? { from: q.from } : {}),
      ...(typeof q.to === 'string' ? { to: q.to } : {}),
      ...(typeof q.hook === 'string' ? { hook: q.hook } : {}),
      ...(limit !== undefined ? { limit } : {}),
    });
    res.json({ invocations });
  });
  router.get('/tenants/:id/invocations/:rid', async (req, res) => {
    queryOf(req, []);
    res.json(await data.readInvocation(principalOf(res), param(req, 'id'), param(req, 'rid')));
  });
  router.post('/tenants/:id/invocations/:rid/replay', async (req, res) => {
    queryOf(req, []);
    res.json(await data.replay(principalOf(res), param(req, 'id'), param(req, 'rid')));
  });
  // Override rates per pack, version and rule (PHI-free counts; see DataAdmin.feedbackSummary).
  router.get('/tenants/:id/feedback/summary', async (req, res) => {
    const q = queryOf(req, ['since', 'until'], { once: true });
    res.json(
      await data.feedbackSummary(principalOf(res), param(req, 'id'), {
        ...(typeof q.since === 'string' ? { since: q.since } : {}),
        ...(typeof q.until === 'string' ? { until: q.until } : {}),
      }),
    );
  });
  router.get('/tenants/:id/keys', async (req, res) => {
    queryOf(req, []);
    res.json(await data.keyStatus(principalOf(res), param(req, 'id')));
  });
  router.post('/tenants/:id/keys/rotate', act('key.rotate'), json, async (req, res) => {
    queryOf(req, []);
    const body = (req.body ?? {}) as Record<string, unknown>;
    if (body.emergency !== undefined && typeof body.emergency !== 'boolean') {
      throw new ServiceError(400, 'invalid_request', 'emergency: must be a boolean', {
        body: { field: 'emergency' },
      });
    }
    const emergency = body.emergency === true;
    const job = await data.rotateTenantKey(principalOf(res), param(req, 'id'), emergency);
    res.status(202).json(job);
    done(res, { job: job.id, emergency });
  });
  router.post(
    '/regions/:region/kek/rotate',
    act('key.kek.rotate', () => undefined),
    async (req, res) => {
      queryOf(req, []);
      const job = await data.rotateKek(principalOf(res), param(req, 'region'));
      res.status(202).json(job);
      done(res, { job: job.id });
    },
  );
  router.get('/jobs/:jobId', async (req, res) => {
    queryOf(req, []);
    res.json(await data.job(principalOf(res), param(req, 'jobId')));
  });
  router.delete('/tenants/:id', act('tenant.deprovision'), async (req, res) => {
    queryOf(req, []);
    const result = await data.deprovision(principalOf(res), param(req, 'id'));
    res.json(result);
    done(res, { registryRemoved: result.registryRemoved });
  });
  router.post('/tenants/:id/backups', act('backup.create'), async (req, res) => {
    queryOf(req, []);
    res.status(201).json(await data.backup(principalOf(res), param(req, 'id')));
    done(res);
  });
  router.post('/restores', act('restore.tenant', bodyField('tenant')), json, async (req, res) => {
    queryOf(req, []);
    const body = (req.body ?? {}) as Record<string, unknown>;
    if (typeof body.backup !== 'string' || body.backup === '') {
      throw new ServiceError(400, 'invalid_request', 'backup: the backup folder is required', {
        body: { field: 'backup' },
      });
    }
    if (body.tenant !== undefined && typeof body.tenant !== 'string') {
      throw new ServiceError(400, 'invalid_request', 'tenant: must be a tenant id', {
        body: { field: 'tenant' },
      });
    }
    if (body.allowUnauthenticated !== undefined && typeof body.allowUnauthenticated !== 'boolean') {
      throw new ServiceError(400, 'invalid_request', 'allowUnauthenticated: must be a boolean', {
        body: { field: 'allowUnauthenticated' },
      });
    }
    const result = await data.restore(principalOf(res), body.backup, body.tenant, {
      allowUnauthenticated: body.allowUnauthenticated === true,
    });
    res.json(result);
    done(res, { tenant: result.tenant });
  });
  // `anchor=SEQ:HASH` (repeatable): heads kept earlier, which the chain must still hold. Any
  // other parameter is refused: a misspelt `anchor` must not verify without the anchors.
  router.get('/tenants/:id/audit/verify', async (req, res) => {
    const kept = anchorsOfQuery(queryOf(req, ['anchor']).anchor);
    res.json(await data.verifyAudit(principalOf(res), param(req, 'id'), kept));
  });
  router.get('/tenants/:id/audit/head', async (req, res) => {
    queryOf(req, []);
    res.json(await data.auditHead(principalOf(res), param(req, 'id')));
  });

  router.get('/audit/verify', async (req, res) => {
    const kept = anchorsOfQuery(queryOf(req, ['anchor']).anchor);
    res.json(await verifyControlPlaneAudit(deps.controlPlane, principalOf(res), kept));
  });
  router.get('/audit/head', async (req, res) => {
    queryOf(req, []);
    res.json(await controlPlaneAuditHead(deps.controlPlane, principalOf(res)));
  });
  router.get('/audit', async (req, res) => {
    const q = queryOf(req, ['from', 'to', 'tenant', 'type', 'requestId']);
    // Passed on as given: a repeated parameter is a list, which the repository refuses (400
    // naming the field) rather than ignoring the filter.
    const query = {
      from: q.from,
      to: q.to,
      tenant: q.tenant,
      type: q.type,
      requestId: q.requestId,
    };
    res.json({ events: await admin.listAudit(principalOf(res), query) });
  });

  router.use(auditForbidden(deps, routes));
  router.use(actions.errors);
  return router;
}

/** One middleware running `first`, then (unless it failed) `second`: a body parser and a check. */
function series(first: RequestHandler, second: RequestHandler): RequestHandler {
  return (req, res, next) => {
    first(req, res, (err?: unknown) => {
      if (err !== undefined && err !== null) {
        next(err);
        return;
      }
      Promise.resolve(second(req, res, next)).catch(next);
    });
  };
}

/** Longest unknown query parameter name echoed back in a refusal. */
const MAX_PARAM_NAME = 64;

/**
 * The request's query parameters, checked against the ones the route reads: any other is
 * refused (400 naming it and listing the known ones), never ignored, since an ignored filter
 * (`?patient=…` on a record list) answers with everything while the caller believes it
 * filtered. With `once`, a known parameter given more than once (a list, which no filter here
 * takes) is refused too, naming it; without it the route passes lists on to a check of its own.
 * @throws ServiceError 400 `invalid_request` with `field` (the parameter) and `known`.
 */
function queryOf<K extends string>(
  req: Request,
  known: readonly K[],
  opts: { once?: boolean } = {},
): Partial<Record<K, unknown>> {
  const query = req.query as Record<string, unknown>;
  const knownSet: ReadonlySet<string> = new Set(known);
  for (const name of Object.keys(query)) {
    if (!knownSet.has(name)) {
      const shown = name.length > MAX_PARAM_NAME ? `${name.slice(0, MAX_PARAM_NAME)}…` : name;
      throw new ServiceError(
        400,
        'invalid_request',
        `unknown query parameter '${shown}': this route reads ${known.length > 0 ? known.join(', ') : 'none'}`,
        { body: { field: shown, known: [...known] } },
      );
    }
    if (opts.once === true && typeof query[name] !== 'string') {
      throw new ServiceError(400, 'invalid_request', `${name}: give it once, as one value`, {
        body: { field: name },
      });
    }
  }
  const out: Partial<Record<K, unknown>> = {};
  for (const name of known) {
    if (Object.hasOwn(query, name)) {
      out[name] = query[name];
    }
  }
  return out;
}

function param(req: Request, name: string): string {
  return (req.params as Record<string, string | undefined>)[name] ?? '';
}

function bodyOf(req: Request): unknown {
  if (req.body === undefined) {
    throw new ServiceError(415, 'unsupported_media_type', 'Content-Type must be application/json');
  }
  return req.body as unknown;
}

function principalOf(res: express.Response): Principal {
  return adminCtxOf(res).principal;
}

/** sha256 of a token, the only form in which tokens are kept or compared. */
export function hashToken(token: string): Buffer {
  return crypto.createHash('sha256').update(token, 'utf8').digest();
}

/** An issued token's id (`tok_` + hex): the only form of it an audit event names. */
const TOKEN_ID = /^tok_[0-9a-f]{1,64}$/;

/** The audited reason of a refused token (`unknown token` as before, for the evidence counts). */
const REFUSAL_REASON: Readonly<Record<AdminTokenRefusal['reason'], string>> = {
  unknown: 'unknown token',
  revoked: 'revoked',
  expired: 'expired',
};

/** Where an operator token is checked, for its refusal's audit event. */
export interface OperatorSite {
  /** A route the server defines (a pattern, never the raw URL), or a surface's name. */
  endpoint?: string;
  method?: string;
  requestId?: string;
  /** The token is checked again, after the request body was read (it was valid on arrival). */
  recheck?: boolean;
}

/**
 * Resolves an operator bearer token (`Authorization: Bearer <token>`) to a principal: the
 * bootstrap token (compared by sha256, in constant time), else an issued admin token. An
 * unknown, revoked or expired token is counted (`auth_failures{surface="admin"}`) and audited
 * (`admin.auth` failure: the reason, the token id of a revoked or expired one, and the site's
 * method, endpoint and request id when given) before the refusal. Role checks are the caller's.
 * @throws AdminAuthError (401) for a missing, malformed, unknown, revoked or expired token.
 */
export async function resolveOperator(
  deps: Deps,
  authorization: string | undefined,
  site: OperatorSite = {},
): Promise<Principal> {
  const m =
    typeof authorization === 'string'
      ? /^Bearer ([A-Za-z0-9._~+/=-]+)$/i.exec(authorization)
      : null;
  const token = m?.[1];
  if (!token) {
    throw new AdminAuthError('missing or malformed admin bearer token');
  }
  if (
    deps.bootstrapTokenHash &&
    crypto.timingSafeEqual(hashToken(token), deps.bootstrapTokenHash)
  ) {
    return { tokenId: 'bootstrap', role: 'platform-operator' };
  }
  const checked = await deps.controlPlane.adminTokens.check(token);
  if ('principal' in checked) {
    return checked.principal;
  }
  const refused = checked.refused;
  // A repository's reason this version does not know is audited as `unknown token`.
  const reason = Object.hasOwn(REFUSAL_REASON, refused.reason)
    ? REFUSAL_REASON[refused.reason]
    : REFUSAL_REASON.unknown;
  deps.metrics.authFailure(
    refused.reason === 'unknown' ? 'unknown_token' : `${refused.reason}_token`,
    'admin',
  );
  const tokenId =
    refused.reason !== 'unknown' && TOKEN_ID.test(refused.tokenId) ? refused.tokenId : undefined;
  // A failed audit write is logged and counted; the token is refused all the same (401).
  await auditRefusal(
    deps,
    site.requestId ?? '',
    {
      type: 'admin.auth',
      outcome: 'failure',
      detail: {
        reason,
        ...(tokenId !== undefined ? { tokenId } : {}),
        ...(site.method !== undefined ? { method: site.method } : {}),
        ...(site.endpoint !== undefined ? { endpoint: site.endpoint } : {}),
        ...(site.requestId !== undefined ? { requestId: site.requestId.slice(0, 64) } : {}),
        ...(site.recheck === true ? { recheck: true } : {}),
      },
    },
    (event) => deps.failureAudit.record(event),
  );
  throw new AdminAuthError(`admin token refused: ${reason}`);
}

/** The admin routes' patterns and methods, read from the router once it is built. */
interface RouteTable {
  /** The pattern (`/admin/tenants/:id/keys`) of the route `method` + `path` would reach. */
  match(method: string, path: string, mount: string): string;
}

/** The audited endpoint of an admin request that no route matches: never the raw path. */
const NO_ROUTE = '/*';

/**
 * Resolves a request to its route pattern before routing (a refused token never reaches a
 * route, and its audit event must still name one). Built lazily from the router's own routes, so
 * it cannot drift from them; a route path is literal segments and `:param`s.
 */
function routeTable(router: Router): RouteTable {
  let table: Array<{ path: string; methods: Set<string>; re: RegExp }> | undefined;
  const build = () =>
    router.stack.flatMap((layer) => {
      const route = layer.route as
        { path?: unknown; methods?: Record<string, boolean> } | undefined;
      if (!route || typeof route.path !== 'string') {
        return [];
      }
      const segments = route.path
        .split('/')
        .map((seg) => (seg.startsWith(':') ? '[^/]+' : seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')));
      const methods = new Set(
        Object.keys(route.methods ?? {})
          .filter((k) => route.methods?.[k] === true)
          .map((k) => k.toUpperCase()),
      );
      if (methods.has('GET')) {
        methods.add('HEAD');
      }
      // Express.Router(): case-insensitive, a trailing slash allowed (not strict).
      return [{ path: route.path, methods, re: new RegExp(`^${segments.join('/')}/?$`, 'i') }];
    });
  return {
    match(method, path, mount) {
      table ??= build();
      const hit = table.find((r) => r.methods.has(method) && r.re.test(path));
      return `${mount}${hit ? hit.path : NO_ROUTE}`;
    },
  };
}

/** The request's method as audited (Node's parser accepts only known methods). */
function methodOf(req: Request): string {
  return req.method.slice(0, 16);
}

/**
 * The admin API's authentication middleware: {@link resolveOperator} (a refusal audited with the
 * request id, the method and the route pattern the request would reach), then the admin context.
 */
function authenticateAdmin(deps: Deps, routes: RouteTable): RequestHandler {
  return async (req, res, next) => {
    const requestId = requestIdOf(res);
    let principal: Principal;
    try {
      principal = await resolveOperator(deps, req.headers.authorization, {
        requestId,
        method: methodOf(req),
        endpoint: routes.match(req.method, req.path, req.baseUrl),
      });
    } catch (err) {
      // Refused before routing: the log line names the route it would have reached.
      noteRoutePattern(res, routes.match(req.method, req.path, req.baseUrl));
      throw err;
    }
    (res.locals as { admin?: unknown }).admin = {
      requestId,
      principal,
      log: deps.log.child({
        requestId,
        ...(principal.tenant ? { tenant: principal.tenant } : {}),
        role: principal.role,
      }),
    };
    next();
  };
}

/**
 * Checks the request's token again once its body is read (route middleware, right after the
 * body parser): a token revoked (or expired) while the body was on its way is refused with 401
 * (audited `admin.auth`, `recheck: true`) before the action runs, instead of acting, and being
 * audited, as a principal that no longer exists.
 */
function recheckAdmin(deps: Deps): RequestHandler {
  return async (req, res, next) => {
    await recheckToken(deps, req, res);
    next();
  };
}

/**
 * The request's token checked again (see {@link recheckAdmin}); also run by a pack upload once
 * its pack is validated and tested (up to tens of seconds), right before it is stored.
 * @throws AdminAuthError (401, audited `admin.auth` with `recheck: true`) if it no longer holds.
 */
async function recheckToken(deps: Deps, req: Request, res: express.Response): Promise<void> {
  const ctx = adminCtxOf(res);
  const again = await resolveOperator(deps, req.headers.authorization, {
    requestId: ctx.requestId,
    method: methodOf(req),
    endpoint: routePatternOf(res) ?? `${req.baseUrl}${NO_ROUTE}`,
    recheck: true,
  });
  if (again.tokenId !== ctx.principal.tokenId) {
    throw new AdminAuthError('admin token changed during the request');
  }
}

/** Every action authorize() knows: a refusal's audited reason is one of these (or `unknown`). */
const KNOWN_ACTIONS: ReadonlySet<string> = new Set<string>(ADMIN_ACTIONS);

/**
 * The action a ForbiddenError refused (authorize() and the admin service name it): a closed set,
 * so it can be a count's reason; `unknown` for a refusal that names none.
 */
export function refusedAction(err: ForbiddenError): string {
  return err.action !== undefined && KNOWN_ACTIONS.has(err.action) ? err.action : 'unknown';
}

/** The route's parameters, read from the path by the pattern (literal segments and `:name`s). */
function paramsOf(pattern: string, path: string): Record<string, string> {
  const names = pattern.split('/');
  const values = path.split('/');
  const out: Record<string, string> = {};
  names.forEach((name, i) => {
    const value = values[i];
    if (name.startsWith(':') && value !== undefined) {
      try {
        out[name.slice(1)] = decodeURIComponent(value);
      } catch {
        // Not decodable: not a tenant id either.
      }
    }
  });
  return out;
}

/**
 * The tenant a refused request was aimed at, if it names one with a tenant id's syntax: the
 * `:id` of a `/tenants/:id` route, the `tenant` of a token issue, restore or audit query, the
 * tenant of the token a revocation names.
 */
async function targetTenantOf(
  deps: Deps,
  req: Request,
  pattern: string,
  mount: string,
): Promise<string | undefined> {
  const route = pattern.slice(mount.length);
  const path = (req.originalUrl.split('?')[0] ?? '').slice(mount.length);
  const params = paramsOf(route, path);
  const body = (req.body ?? {}) as Record<string, unknown>;
  const query = req.query as Record<string, unknown>;
  let target: unknown;
  if (route.startsWith('/tenants/:id')) {
    target = params.id;
  } else if (route === '/tokens' || route === '/restores') {
    target = body.tenant;
  } else if (route === '/audit') {
    target = query.tenant;
  } else if (route === '/tokens/:id' && params.id !== undefined && TOKEN_ID.test(params.id)) {
    // Refused after the service read the token (no extra cost per request class).
    const info = (await deps.controlPlane.adminTokens.list()).find((x) => x.id === params.id);
    target = info?.tenant;
  }
  return typeof target === 'string' && TENANT_ID_PATTERN.test(target) ? target : undefined;
}

/** Whether `id` is a registered tenant (a lookup that fails says no). */
async function isRegistered(deps: Deps, id: string): Promise<boolean> {
  try {
    await deps.controlPlane.tenants.get(id);
    return true;
  } catch {
    return false;
  }
}

/**
 * Router error middleware, after the routes: audits a refused access (ForbiddenError, 403) as
 * `admin.forbidden` in the control plane, within the refusal audit budget per second (beyond
 * it: `admin.forbidden.suppressed` counts per action, target tenant and actor). The event's
 * `tenant` is the target tenant when it is registered, so its auditors find the attempt in its
 * trail (`GET /admin/audit?tenant=`); an unregistered one is named in `detail.targetTenant` only
 * (a client's text never becomes an event's tenant or a count's key). The route pattern, not the
 * URL: a URL carries the ids (records, tokens) the request probed. The refusal stands whatever
 * the audit write does.
 */
/**
 * Audits a refused access (`admin.forbidden`, within the refusal audit budget): the actor, the
 * action refused, the target tenant (as the event's tenant only when registered), where.
 */
export async function recordForbidden(
  deps: Deps,
  err: ForbiddenError,
  site: {
    principal: Principal;
    requestId: string;
    method: string;
    endpoint: string;
    target?: { id: string; registered: boolean };
  },
): Promise<void> {
  const { principal, target } = site;
  const reason = refusedAction(err);
  deps.metrics.adminForbidden(reason);
  const event: AuditEvent & { detail: { reason: string } } = {
    type: 'admin.forbidden',
    outcome: 'failure',
    actor: actorOf(principal),
    ...(target?.registered === true ? { tenant: target.id } : {}),
    detail: {
      reason,
      ...(principal.tenant !== undefined ? { actorTenant: principal.tenant } : {}),
      ...(target !== undefined && !target.registered ? { targetTenant: target.id } : {}),
      method: site.method,
      endpoint: site.endpoint,
      requestId: site.requestId.slice(0, 64),
    },
  };
  await auditRefusal(deps, site.requestId, event, (e) => deps.failureAudit.record(e));
}

function auditForbidden(deps: Deps, routes: RouteTable): ErrorRequestHandler {
  return async (err: unknown, req, res, next) => {
    if (err instanceof ForbiddenError) {
      const ctx = (res.locals as { admin?: { principal: Principal; requestId: string } }).admin;
      if (ctx) {
        try {
          const pattern = routePatternOf(res) ?? routes.match(req.method, req.path, req.baseUrl);
          const target = await targetTenantOf(deps, req, pattern, req.baseUrl);
          const registered = target !== undefined && (await isRegistered(deps, target));
          (res.locals as { adminRefusal?: { targetTenant?: string } }).adminRefusal = {
            ...(target !== undefined ? { targetTenant: target } : {}),
          };
          await recordForbidden(deps, err, {
            principal: ctx.principal,
            requestId: ctx.requestId,
            method: methodOf(req),
            endpoint: pattern,
            ...(target !== undefined ? { target: { id: target, registered } } : {}),
          });
        } catch (auditErr: unknown) {
          // Never turns the 403 into another answer (auditRefusal already catches the write).
          deps.log.error(
            {
              requestId: ctx.requestId,
              err: { name: auditErr instanceof Error ? auditErr.name : typeof auditErr },
            },
            'refusal not audited',
          );
        }
      }
    }
    next(err);
  };
}
