/**
 * The Express app factory. Routes are built from Deps; no module-level state.
 */
import crypto from 'node:crypto';
import express, { type Express, type RequestHandler } from 'express';
import { adminRouter } from './admin-routes.ts';
import { AdminService } from './admin-service.ts';
import { cdsRouter } from './cds-routes.ts';
import { DataAdmin } from './data-admin.ts';
import type { Deps } from './context.ts';
import { errorHandler, notFoundHandler, recordRoutePattern } from './error-handler.ts';
import { uiRouter } from './ui-routes.ts';

export function createApp(deps: Deps): Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.set('strict routing', true);
  app.set('case sensitive routing', true);
  app.use(assignRequestId);
  app.use(recordRoutePattern);
  app.use('/cds-services', cors(deps));
  // Liveness: the process answers. Readiness: the control plane, this region's key provider
  // and its data plane answer, and Redis when it holds the replay cache (a plane that cannot
  // unwrap keys, or reach the database its tenants' stores live in, must not take traffic);
  // a process shutting down is not ready. A part down is named with a reason (`reasons`).
  app.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
  const readiness = readinessProbe(deps);
  app.get('/readyz', async (_req, res) => {
    const checks = await readiness();
    res.status(checks.ready ? 200 : 503).json(checks);
  });
  // Prometheus text; no tenant labels, so it is safe to scrape from any region.
  app.get('/metrics', async (_req, res) => {
    res.setHeader('Content-Type', deps.metrics.contentType);
    res.send(await deps.metrics.render());
  });
  app.use('/cds-services', cdsRouter(deps));
  const dataAdmin = DataAdmin.of(deps);
  app.use(
    '/admin',
    adminRouter(
      deps,
      new AdminService({
        controlPlane: deps.controlPlane,
        evaluator: deps.evaluator,
        regions: deps.matrix.regions,
        packCheck: deps.config.packCheck,
      }),
      dataAdmin,
    ),
  );
  // The card viewer: rule-author playground and SMART app (server/ui/, docs/smart-app.md).
  app.use(
    uiRouter(deps, {
      smartClientId: deps.config.smartClientId,
      // SMART app feedback lands in the tenant's store like CDS Hooks feedback.
      onFeedback: async (tenantId, serviceId, items) => {
        await deps.stores.store(tenantId).saveFeedback(items, { service: serviceId });
      },
    }),
  );
  app.use(notFoundHandler);
  app.use(errorHandler(deps.log));
  return app;
}

/** A part of `/readyz`: the control plane, this region's key provider and data plane, Redis. */
type ReadyPart = 'controlPlane' | 'keyProvider' | 'dataPlane' | 'replayCache';

/** Why a part is down: a short code and a message naming no secret, host or PHI. */
interface DownReason {
  code: string;
  message: string;
}

/** A driver or system error code, if it is a short upper-case one (e.g. SQLITE_CANTOPEN). */
function errorCode(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^[A-Z][A-Z0-9_]{0,40}$/.test(code) ? code : 'error';
}

/**
 * The readiness probe. Each part is a cheap check (no table scan: a load balancer polls it
 * several times a second): the control plane's `SELECT 1`, the key provider's round trip, the
 * data plane's `SELECT 1` or write probe, Redis's PING and eviction policy. A part that goes down
 * or comes back is logged once (warn, info) and `cellcds_ready{part}` follows it.
 */
function readinessProbe(deps: Deps): () => Promise<Record<string, unknown> & { ready: boolean }> {
  const last = new Map<ReadyPart, boolean>();
  const note = (part: ReadyPart, down: DownReason | undefined): void => {
    const up = down === undefined;
    deps.metrics.readiness(part, up);
    const before = last.get(part);
    last.set(part, up);
    if (before === up || (before === undefined && up)) {
      return;
    }
    if (up) {
      deps.log.info({ part }, 'readiness: part is back up');
    } else {
      deps.log.warn({ part, code: down.code, reason: down.message }, 'readiness: part is down');
    }
  };
  const shuttingDown = () =>
    deps.lifecycle?.shuttingDown === true
      ? { ready: false, shuttingDown: true, region: deps.region.id }
      : undefined;
  return async () => {
    const early = shuttingDown();
    if (early) {
      return early;
    }
    const checks: Array<Promise<[ReadyPart, DownReason | undefined]>> = [
      deps.controlPlane.ping().then(
        () => ['controlPlane', undefined],
        (err: unknown) => [
          'controlPlane',
          { code: errorCode(err), message: 'the control-plane database does not answer' },
        ],
      ),
      deps.keyProvider.health().then(
        (h) => [
          'keyProvider',
          h.ok ? undefined : { code: 'unusable', message: h.detail ?? 'keys cannot be unwrapped' },
        ],
        () => ['keyProvider', { code: 'error', message: 'the key provider failed its check' }],
      ),
      // PostgreSQL: SELECT 1 on the region's connection (bounded by the pool's acquire and
      // statement timeouts); SQLite: a small file written and fsynced in the region's folder.
      deps.stores.ping().then(
        (p) => [
          'dataPlane',
          p.ok
            ? undefined
            : { code: p.code ?? 'error', message: p.error ?? 'the data plane does not answer' },
        ],
        () => ['dataPlane', { code: 'error', message: 'the data plane failed its check' }],
      ),
    ];
    if (deps.replayCacheHealth) {
      checks.push(
        deps.replayCacheHealth().then(
          (h) => ['replayCache', h.ok ? undefined : { code: h.code, message: h.message }],
          () => ['replayCache', { code: 'error', message: 'the replay cache failed its check' }],
        ),
      );
    }
    const body: Record<string, unknown> & { ready: boolean } = {
      ready: true,
      region: deps.region.id,
    };
    const reasons: Partial<Record<ReadyPart, DownReason>> = {};
    for (const [part, down] of await Promise.all(checks)) {
      note(part, down);
      body[part] = down ? 'down' : 'ok';
      if (down) {
        body.ready = false;
        reasons[part] = down;
      }
    }
    if (!body.ready) {
      body.reasons = reasons;
    }
    // A shutdown that began while the parts were checked: out of rotation now, never a 200.
    return shuttingDown() ?? body;
  };
}

const assignRequestId: RequestHandler = (_req, res, next) => {
  const id = crypto.randomUUID();
  (res.locals as { requestId?: string }).requestId = id;
  res.setHeader('X-Request-Id', id);
  next();
};

/**
 * CORS for browser-based CDS clients. Preflight (OPTIONS) is answered without a JWT, as
 * CDS Hooks clients expect; the actual request is still authenticated. Auth is by bearer
 * token, never cookies, so credentials are not allowed.
 */
function cors(deps: Deps): RequestHandler {
  const allowed = deps.config.corsOrigins;
  return (req, res, next) => {
    const origin = req.headers.origin;
    if (allowed === '*') {
      res.setHeader('Access-Control-Allow-Origin', '*');
    } else if (typeof origin === 'string' && allowed.includes(origin)) {
      res.setHeader('Access-Control-Allow-Origin', origin);
      res.setHeader('Vary', 'Origin');
    }
    res.setHeader('Access-Control-Expose-Headers', 'X-Request-Id, WWW-Authenticate');
    if (req.method === 'OPTIONS') {
      res.setHeader('Access-Control-Allow-Methods', 'GET, POST, OPTIONS');
      res.setHeader('Access-Control-Allow-Headers', 'Content-Type, Authorization');
      res.setHeader('Access-Control-Max-Age', '600');
      res.status(204).end();
      return;
    }
    next();
  };
}
