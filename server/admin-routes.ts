/**
 * The admin API (JSON in and out). Every route needs an operator bearer token; what each
 * role may do is decided by tenants/' authorize(), called inside AdminService.
 */
import crypto from 'node:crypto';
import express, {
  type ErrorRequestHandler,
  type Request,
  type RequestHandler,
  type Router,
} from 'express';
import { AdminAuthError } from '../tenants/index.ts';
import type { Principal } from '../tenants/index.ts';
import { adminActionLog } from './admin-action-log.ts';
import type { AdminService } from './admin-service.ts';
import type { DataAdmin } from './data-admin.ts';
import type { Deps } from './context.ts';
import { adminCtxOf, requestIdOf } from './context.ts';
import { ServiceError, unsupportedMediaType } from './errors.ts';
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
  const json = express.json({ limit: '1mb', type: ['application/json', 'application/*+json'] });
  // Answers carry one-time tokens and decrypted records: no cache may keep them (refusals too).
  router.use((_req, res, next) => {
    res.setHeader('Cache-Control', 'no-store');
    next();
  });
  router.use(authenticateAdmin(deps));
  // One `admin action` line per state-changing call (server/admin-action-log.ts).
  const actions = adminActionLog(deps.log);
  const act = actions.mark;
  const done = actions.done;
  const bodyField = (name: string) => (req: Request) =>
    ((req.body ?? {}) as Record<string, unknown>)[name];

  router.post('/tenants', act('admin.tenant.create', bodyField('id')), json, async (req, res) => {
    res.status(201).json(await admin.createTenant(principalOf(res), bodyOf(req)));
    done(res);
  });
  router.get('/tenants', async (_req, res) => {
    res.json({ tenants: await admin.listTenants(principalOf(res)) });
  });
  router.get('/tenants/:id', async (req, res) => {
    res.json(await admin.getTenant(principalOf(res), param(req, 'id')));
  });
  router.patch('/tenants/:id', act('admin.tenant.update'), json, async (req, res) => {
    res.json(await admin.updateTenant(principalOf(res), param(req, 'id'), bodyOf(req)));
    done(res);
  });
  router.post('/tenants/:id/suspend', act('admin.tenant.suspend'), async (req, res) => {
    res.json(await admin.setTenantStatus(principalOf(res), param(req, 'id'), 'suspended'));
    done(res);
  });
  router.post('/tenants/:id/resume', act('admin.tenant.resume'), async (req, res) => {
    res.json(await admin.setTenantStatus(principalOf(res), param(req, 'id'), 'active'));
    done(res);
  });
  router.post(
    '/tenants/:id/failover',
    act('residency.failover.declared'),
    json,
    async (req, res) => {
      const body = (req.body ?? {}) as Record<string, unknown>;
      const tenant = await admin.declareFailover(principalOf(res), param(req, 'id'), body.region);
      res.json(tenant);
      done(res, tenant.failover ? { region: tenant.failover.region } : {});
    },
  );
  router.delete('/tenants/:id/failover', act('residency.failover.cleared'), async (req, res) => {
    res.json(await admin.clearFailover(principalOf(res), param(req, 'id')));
    done(res);
  });
  router.put(
    '/tenants/:id/subscriptions',
    act('admin.tenant.subscriptions'),
    json,
    async (req, res) => {
      res.json(await admin.setSubscriptions(principalOf(res), param(req, 'id'), bodyOf(req)));
      done(res);
    },
  );

  router.post('/tokens', act('admin.token.issue', bodyField('tenant')), json, async (req, res) => {
    const issued = await admin.issueToken(principalOf(res), bodyOf(req));
    res.status(201).json(issued);
    done(res, { tokenId: issued.id, tokenRole: issued.role });
  });
  router.get('/tokens', async (_req, res) => {
    res.json({ tokens: await admin.listTokens(principalOf(res)) });
  });
  router.delete(
    '/tokens/:id',
    act('admin.token.revoke', () => undefined),
    async (req, res) => {
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
  const packTooLarge: ErrorRequestHandler = (err: unknown, _req, _res, next) => {
    const tooLarge = (err as { type?: unknown } | null)?.type === 'entity.too.large';
    next(
      tooLarge
        ? new ServiceError(
            413,
            'payload_too_large',
            `a rule pack upload may be at most ${PACK_UPLOAD_LIMIT / (1024 * 1024)} MB; split the pack`,
            { body: { limitBytes: PACK_UPLOAD_LIMIT }, cause: err },
          )
        : err,
    );
  };
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
    async (req, res) => {
      if (!req.is([...YAML_TYPES, 'application/json', 'application/*+json'])) {
        throw unsupportedMediaType('application/json or application/yaml');
      }
      const text = typeof req.body === 'string' ? req.body : '';
      // Parsed in the validation worker, with the rest (a large YAML takes seconds to parse).
      const format = req.is(YAML_TYPES) ? 'yaml' : 'json';
      const result = await admin.uploadPackText(principalOf(res), text, format);
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
  router.get('/rule-packs', async (_req, res) => {
    res.json({ packs: await admin.listPacks(principalOf(res)) });
  });
  router.get('/rule-packs/:id/versions/:version', async (req, res) => {
    res.json(await admin.getPack(principalOf(res), param(req, 'id'), param(req, 'version')));
  });

  // ------------------------------------------------------------ data plane (this region)
  router.get('/tenants/:id/invocations', async (req, res) => {
    const q = req.query as Record<string, unknown>;
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
    res.json(await data.readInvocation(principalOf(res), param(req, 'id'), param(req, 'rid')));
  });
  router.post('/tenants/:id/invocations/:rid/replay', async (req, res) => {
    res.json(await data.replay(principalOf(res), param(req, 'id'), param(req, 'rid')));
  });
  router.get('/tenants/:id/keys', async (req, res) => {
    res.json(await data.keyStatus(principalOf(res), param(req, 'id')));
  });
  router.post('/tenants/:id/keys/rotate', act('key.rotate'), json, async (req, res) => {
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
      const job = await data.rotateKek(principalOf(res), param(req, 'region'));
      res.status(202).json(job);
      done(res, { job: job.id });
    },
  );
  router.get('/jobs/:jobId', async (req, res) => {
    res.json(await data.job(principalOf(res), param(req, 'jobId')));
  });
  router.delete('/tenants/:id', act('tenant.deprovision'), async (req, res) => {
    const result = await data.deprovision(principalOf(res), param(req, 'id'));
    res.json(result);
    done(res, { registryRemoved: result.registryRemoved });
  });
  router.post('/tenants/:id/backups', act('backup.create'), async (req, res) => {
    res.status(201).json(await data.backup(principalOf(res), param(req, 'id')));
    done(res);
  });
  router.post('/restores', act('restore.tenant', bodyField('tenant')), json, async (req, res) => {
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
  router.get('/tenants/:id/audit/verify', async (req, res) => {
    res.json(await data.verifyAudit(principalOf(res), param(req, 'id')));
  });

  router.get('/audit/verify', async (_req, res) => {
    res.json(await admin.verifyControlPlaneAudit(principalOf(res)));
  });
  router.get('/audit', async (req, res) => {
    const q = req.query as Record<string, unknown>;
    const query = {
      ...(typeof q.from === 'string' ? { from: q.from } : {}),
      ...(typeof q.to === 'string' ? { to: q.to } : {}),
      ...(typeof q.tenant === 'string' ? { tenant: q.tenant } : {}),
      ...(typeof q.type === 'string' ? { type: q.type } : {}),
    };
    res.json({ events: await admin.listAudit(principalOf(res), query) });
  });

  router.use(actions.errors);
  return router;
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

/**
 * Resolves an operator bearer token (`Authorization: Bearer <token>`) to a principal: the
 * bootstrap token (compared by sha256, in constant time), else an issued admin token. An
 * unknown or revoked token is counted (`auth_failures{surface="admin"}`) and audited
 * (`admin.auth` failure, plus `detail.endpoint` when given) before the refusal. Role checks are
 * the caller's.
 * @throws AdminAuthError (401) for a missing, malformed, unknown or revoked token.
 */
export async function resolveOperator(
  deps: Deps,
  authorization: string | undefined,
  opts: { endpoint?: string } = {},
): Promise<Principal> {
  const m =
    typeof authorization === 'string' ? /^Bearer ([A-Za-z0-9._~+/=-]+)$/.exec(authorization) : null;
  const token = m?.[1];
  if (!token) {
    throw new AdminAuthError('missing or malformed admin bearer token');
  }
  let principal: Principal | undefined;
  if (
    deps.bootstrapTokenHash &&
    crypto.timingSafeEqual(hashToken(token), deps.bootstrapTokenHash)
  ) {
    principal = { tokenId: 'bootstrap', role: 'platform-operator' };
  } else {
    principal = await deps.controlPlane.adminTokens.authenticate(token);
  }
  if (!principal) {
    deps.metrics.authFailure('unknown_token', 'admin');
    // A failed audit write is logged and counted; the token is refused all the same (401).
    await auditRefusal(
      deps,
      '',
      {
        type: 'admin.auth',
        outcome: 'failure',
        detail: {
          reason: 'unknown token',
          ...(opts.endpoint === undefined ? {} : { endpoint: opts.endpoint }),
        },
      },
      (event) => deps.failureAudit.record(event),
    );
    throw new AdminAuthError('unknown or revoked admin token');
  }
  return principal;
}

/** The admin API's authentication middleware: {@link resolveOperator}, then the admin context. */
function authenticateAdmin(deps: Deps): RequestHandler {
  return async (req, res, next) => {
    const principal = await resolveOperator(deps, req.headers.authorization);
    const requestId = requestIdOf(res);
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
