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
import { errorHandler, notFoundHandler } from './error-handler.ts';
import { uiRouter } from './ui-routes.ts';

export function createApp(deps: Deps): Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.set('strict routing', true);
  app.set('case sensitive routing', true);
  app.use(assignRequestId);
  app.use('/cds-services', cors(deps));
  // Liveness: the process answers. Readiness: the control plane, this region's key provider
  // and its data plane answer (a plane that cannot unwrap keys, or reach the database its
  // tenants' stores live in, must not take traffic).
  app.get('/healthz', (_req, res) => {
    res.json({ status: 'ok' });
  });
  app.get('/readyz', async (_req, res) => {
    const checks = await readiness(deps);
    res.status(checks.ready ? 200 : 503).json(checks);
  });
  // Prometheus text; no tenant labels, so it is safe to scrape from any region.
  app.get('/metrics', async (_req, res) => {
    res.setHeader('Content-Type', deps.metrics.contentType);
    res.send(await deps.metrics.render());
  });
  app.use('/cds-services', cdsRouter(deps));
  const dataAdmin = new DataAdmin({
    controlPlane: deps.controlPlane,
    stores: deps.stores,
    evaluator: deps.evaluator,
    backupDir: deps.backupDir,
    regions: deps.matrix.regions,
  });
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

async function readiness(deps: Deps): Promise<{
  ready: boolean;
  region: string;
  controlPlane: 'ok' | 'down';
  keyProvider: 'ok' | 'down';
  dataPlane: 'ok' | 'down';
}> {
  const controlPlane = await deps.controlPlane.tenants.list().then(
    () => 'ok' as const,
    () => 'down' as const,
  );
  const keyProvider = await deps.keyProvider.health().then(
    (h) => (h.ok ? ('ok' as const) : ('down' as const)),
    () => 'down' as const,
  );
  // PostgreSQL: SELECT 1 on the region's connection (bounded by the pool's acquire and
  // statement timeouts); SQLite: the region's data folder is writable.
  const dataPlane = await deps.stores.ping().then(
    (p) => (p.ok ? ('ok' as const) : ('down' as const)),
    () => 'down' as const,
  );
  return {
    ready: controlPlane === 'ok' && keyProvider === 'ok' && dataPlane === 'ok',
    region: deps.region.id,
    controlPlane,
    keyProvider,
    dataPlane,
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
