/**
 * CDS Hooks 2.0 endpoints: discovery, service invocation, feedback. Thin: each handler
 * authenticates, delegates to hooks/ and rules/, and returns data or throws.
 */
import express, { type Request, type RequestHandler, type Response, type Router } from 'express';
import {
  discoveryEntry,
  isHookName,
  parseFeedbackRequest,
  parseHookRequest,
} from '../hooks/index.ts';
import { AuthError, mayServe, NotFoundError, RETRYABLE_AUTH_FAILURES } from '../tenants/index.ts';
import type { FeedbackRefusal, Tenant } from '../tenants/index.ts';
import type { Deps } from './context.ts';
import { ctxOf, requestIdOf } from './context.ts';
import { bodyTooLarge, ServiceError, unsupportedMediaType } from './errors.ts';
import { assertServedHere, recordAuthFailure, serviceEndpoint } from './guards.ts';
import { runHookCall } from './hook-call.ts';
import { hookOutcomeForStatus } from './metrics.ts';
import type { HookEndpoint, HookOutcome } from './metrics.ts';

const JSON_TYPES = ['application/json', 'application/*+json'];

/** Builds the /cds-services router. */
export function cdsRouter(deps: Deps): Router {
  const router = express.Router();
  const limitBytes = deps.config.bodyLimitBytes;
  // A body over the limit: 413 naming it and its setting, as a pack upload's does (the EHR's
  // integrator learns what to send, or what to ask the operator to raise). Mounted after the
  // routes, it sees their errors; any other error goes on unchanged.
  const tooLarge = bodyTooLarge(
    `a CDS Hooks request body may be at most ${limitBytes} bytes (the server's CELLCDS_BODY_LIMIT_BYTES)`,
    limitBytes,
  );
  const json = express.json({ limit: limitBytes, type: JSON_TYPES, strict: true });

  router.get(
    '/',
    observe(deps, 'discovery'),
    anonymousDiscovery(deps),
    authenticate(
      deps,
      () => '/cds-services',
      () => ({ endpoint: '/cds-services' }),
    ),
    async (_req, res) => {
      res.json(await discoveryOf(deps, ctxOf(res).tenant));
    },
  );

  router.post(
    '/:id',
    observe(deps, 'call'),
    requireJson,
    json,
    authenticate(
      deps,
      (req) => `/cds-services/${paramOf(req, 'id')}`,
      (req) => serviceEndpoint(paramOf(req, 'id'), ''),
    ),
    async (req, res) => {
      const started = performance.now();
      const ctx = ctxOf(res);
      const resolved = await deps.directory.service(ctx.tenant, paramOf(req, 'id'));
      (res.locals as { service?: string }).service = resolved.service.id;
      if (!isHookName(resolved.service.hook)) {
        // Packs are validated at upload, so this is a bug, not bad input.
        throw new ServiceError(500, 'internal', 'internal error', {
          detail: `service hook ${resolved.service.hook}`,
        });
      }
      // The parsed body (tens of KiB of objects) is handed to runHookCall and not kept here
      // (nor on `req`): it dies once the record is sealed instead of being copied by every
      // scavenge while the record's write is pending (most of a call's wait). See runHookCall.
      const { cards, pack, result } = await runHookCall(
        deps,
        ctx.tenant,
        resolved,
        // Prefetch keys the service never declared are dropped, unchecked and unstored.
        parseHookRequest(takeBody(req), resolved.service.hook, {
          prefetchKeys: Object.keys(resolved.service.prefetch ?? {}),
        }),
      );
      let ruleErrors = 0;
      let rulesSkipped = 0;
      for (const t of result.trace) {
        // A fired rule that had to drop a broken suggestion (trace error) counts as one too.
        if (
          t.status === 'error' ||
          t.status === 'timeout' ||
          (t.status === 'fired' && t.error !== undefined)
        ) {
          ruleErrors += 1;
        } else if (t.status === 'skipped') {
          rulesSkipped += 1;
        }
      }
      // Warn when checks did not all run (the EHR got a warning or critical card saying so,
      // rules/README.md) or a fired card was altered (a shortened summary, a dropped suggestion).
      const level = ruleErrors + rulesSkipped > 0 ? 'warn' : 'info';
      ctx.log[level](
        {
          service: resolved.service.id,
          hook: resolved.service.hook,
          // Id and version apart: `id@1.3.0-rc.beta1` is e-mail shaped, and the log's
          // e-mail scrubber would censor the whole identity.
          pack: pack.id,
          packVersion: pack.version,
          packHash: pack.hash,
          cardCount: cards.length,
          ruleErrors,
          rulesSkipped,
          ms: Math.round(performance.now() - started),
        },
        'hook call',
      );
      res.json({ cards });
    },
  );

  router.post(
    '/:id/feedback',
    observe(deps, 'feedback'),
    requireJson,
    json,
    authenticate(
      deps,
      (req) => `/cds-services/${paramOf(req, 'id')}/feedback`,
      (req) => serviceEndpoint(paramOf(req, 'id'), '/feedback'),
    ),
    async (req, res) => {
      const ctx = ctxOf(res);
      const resolved = await deps.directory.service(ctx.tenant, paramOf(req, 'id'));
      // A malformed item refuses the whole batch (400, a client bug): nothing is stored.
      const items = parseFeedbackRequest(req.body);
      // Every item that can be stored is (each whole); an item whose card or accepted
      // suggestion this tenant was never sent is refused alone. Exact repeats are stored once.
      const saved = await deps.stores
        .store(ctx.tenant.id)
        .saveFeedback(items, { service: resolved.service.id, partial: true });
      const refused = saved.refused ?? [];
      ctx.log.info(
        {
          service: resolved.service.id,
          feedbackCount: items.length,
          stored: saved.stored,
          duplicates: saved.duplicates,
          refused: refused.length,
        },
        'feedback',
      );
      res.status(200);
      const body = feedbackAnswer(refused, saved.stored + saved.duplicates);
      if (body === undefined) {
        res.end();
      } else {
        res.json(body);
      }
    },
  );

  router.use(tooLarge);
  return router;
}

/**
 * The answer to a feedback batch (CDS Hooks 2.0 defines none): undefined (200, empty body) when
 * every item is on record; `{stored, refused}` (200: a retry cannot help, so the EHR should not
 * retry) when some are; `stored` counts the items on record, exact repeats included, so a
 * retried batch gets the same answer.
 * @throws ServiceError 404 `not_found` when nothing could be stored, naming the first refused
 *   item's field and how many were refused.
 */
function feedbackAnswer(
  refusals: readonly FeedbackRefusal[],
  onRecord: number,
): { stored: number; refused: Array<Record<string, string | number>> } | undefined {
  const [first] = refusals;
  if (first === undefined) {
    return undefined;
  }
  if (onRecord === 0) {
    const n = refusals.length;
    throw new ServiceError(
      404,
      'not_found',
      `${first.what} not found: ${String(n)} feedback item${n === 1 ? '' : 's'} refused`,
      { body: { field: refusedField(first) } },
    );
  }
  return {
    stored: onRecord,
    refused: refusals.map((r) => ({
      index: r.index,
      field: refusedField(r),
      error: 'not_found',
      message: `${r.what} not found`,
    })),
  };
}

/** `feedback[i].card`, or `feedback[i].acceptedSuggestions[j]` for a refused suggestion. */
function refusedField(r: FeedbackRefusal): string {
  const item = `feedback[${String(r.index)}]`;
  return r.what === 'card'
    ? `${item}.card`
    : `${item}.acceptedSuggestions[${String(r.suggestion ?? 0)}]`;
}

function paramOf(req: Request, name: string): string {
  const v = (req.params as Record<string, string | undefined>)[name];
  return v ?? '';
}

/**
 * Hook latency by endpoint, service and outcome (no tenant label: bounded, region-safe). The
 * outcome follows the status, unless a step named it (`unavailable`: refused because the replay
 * cache's backend is down or may evict keys, apart from `error`, the server's own faults).
 */
function observe(deps: Deps, endpoint: HookEndpoint): RequestHandler {
  return (_req, res, next) => {
    const started = performance.now();
    res.on('finish', () => {
      const locals = res.locals as { service?: string; hookOutcome?: HookOutcome };
      deps.metrics.observeHook(
        endpoint,
        locals.service,
        locals.hookOutcome ?? hookOutcomeForStatus(res.statusCode),
        (performance.now() - started) / 1000,
      );
    });
    next();
  };
}

/** 415 unless the body is declared as JSON. */
const requireJson: RequestHandler = (req, _res, next) => {
  if (!req.is(JSON_TYPES)) {
    next(unsupportedMediaType('application/json'));
    return;
  }
  next();
};

/**
 * Discovery without a JWT (CDS-HOOKS.md §11: "optional or configurable"), for the one tenant
 * CELLCDS_ANONYMOUS_DISCOVERY_TENANT names: an EHR's set-up screen or a conformance harness
 * fetching it anonymously. Only a request with no Authorization header, only while that
 * tenant is active and served in this region; anything else goes on to `authenticate` (a
 * request that sends a token is always verified; no token otherwise answers 401).
 */
function anonymousDiscovery(deps: Deps): RequestHandler {
  return async (req, res, next) => {
    const id = deps.config.anonymousDiscoveryTenant;
    if (id === undefined || req.headers.authorization !== undefined) {
      next();
      return;
    }
    // Unknown (deleted since the setting was made): as if unset. Any other failure (the
    // control plane down) goes to the error handler, not to a 401.
    const tenant = await deps.controlPlane.tenants.get(id).catch((err: unknown) => {
      if (err instanceof NotFoundError) {
        return undefined;
      }
      throw err;
    });
    if (
      tenant === undefined ||
      tenant.status !== 'active' ||
      !mayServe(tenant, deps.region.id, deps.matrix.regions)
    ) {
      next();
      return;
    }
    res.json(await discoveryOf(deps, tenant));
  };
}

/** The discovery document of `tenant`: its subscribed services. */
async function discoveryOf(deps: Deps, tenant: Tenant): Promise<{ services: unknown[] }> {
  return {
    services: [...(await deps.directory.services(tenant)).values()].map((r) =>
      discoveryEntry(r.service),
    ),
  };
}

/**
 * Verifies the CDS client JWT; `aud` must be the exact URL of this endpoint under the
 * public base URL. Sets the request context. A refusal is audited under `auditedOf`'s endpoint,
 * not the path: the path is the client's text, of any length.
 */
function authenticate(
  deps: Deps,
  endpointOf: (req: Request) => string,
  auditedOf: (req: Request) => { endpoint: string; idLength?: number },
): RequestHandler {
  return async (req: Request, res: Response, next) => {
    // The canonical endpoint URL, built from the route (not the raw path), so `aud` is
    // compared with exactly one string per endpoint.
    const audience = `${deps.region.publicUrl}${endpointOf(req)}`;
    const requestId = requestIdOf(res);
    const where = { ...auditedOf(req), requestId };
    const identity = await deps.verifier
      .verify(req.headers.authorization, audience)
      .catch((err: unknown) => {
        if (err instanceof AuthError && RETRYABLE_AUTH_FAILURES.has(err.reason)) {
          // A 503 the replay cache's backend caused (Redis down or evicting), not a fault of ours.
          (res.locals as { hookOutcome?: HookOutcome }).hookOutcome = 'unavailable';
        }
        return recordAuthFailure(deps, err, 'cds', where);
      });
    await assertServedHere(deps, identity.tenant, where);
    (res.locals as { ctx?: unknown }).ctx = {
      requestId,
      tenant: identity.tenant,
      identity,
      log: deps.log.child({ requestId, tenant: identity.tenant.id }),
    };
    next();
  };
}

/**
 * The parsed JSON body, removed from `req`. (A local variable would not do: V8 keeps an async
 * function's locals alive across its awaits.)
 */
function takeBody(req: Request): unknown {
  const body: unknown = req.body;
  req.body = undefined;
  return body;
}
