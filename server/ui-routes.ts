/**
 * The card viewer (issue 7): a static front end in server/ui/ for two users, and its JSON APIs.
 *
 * - Playground (`/playground`, `/playground/api/...`): rule authors evaluate a stored pack
 *   version over a bundled Synthea patient or an uploaded Bundle and see cards, trace and the
 *   exact request/response. Operator bearer token, role with `pack:read` (rule-author or
 *   platform-operator). Nothing is stored as a tenant invocation; one PHI-free audit event.
 * - SMART app (`/app/launch`, `/app/`, `/app/api/...`): launched by an EHR (fhirclient, PKCE);
 *   its calls carry the EHR-signed OpenID id_token and are verified against the tenant issuer
 *   registry (tenants/verify-id-token.ts). The tenant's patient-view services then run exactly
 *   like a CDS Hooks call; prefetch comes from the allowlisted FHIR server with the launch's
 *   access token, which is never stored or logged. See docs/smart-app.md.
 *
 * Static files and vendor bundles (fhirclient, marked, DOMPurify) are read once at creation
 * from explicit paths, so no request path ever reaches the file system.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import express, { type Request, type RequestHandler, type Response, type Router } from 'express';
import { z } from 'zod';
import {
  assertSafeJsonKeys,
  finalizeCards,
  isHookName,
  normalizeFhirBaseUrl,
  parseFeedbackRequest,
  parseHookRequest,
} from '../hooks/index.ts';
import type { FeedbackItem } from '../hooks/index.ts';
import {
  answerCards,
  buildRequestFromRecord,
  nowText,
  parseNow,
  readPatientBundle,
} from '../rules/index.ts';
import type { PatientRecord } from '../rules/index.ts';
import { AuthError, authorize, createIdTokenVerifier, ForbiddenError } from '../tenants/index.ts';
import type {
  AppIdentity,
  IdTokenContext,
  IdTokenVerifier,
  Principal,
  SmartLaunchTarget,
} from '../tenants/index.ts';
import { actorOf } from './admin-service.ts';
import { recordForbidden, resolveOperator } from './admin-routes.ts';
import type { Deps } from './context.ts';
import { requestIdOf } from './context.ts';
import { assertServedHere, recordAuthFailure } from './guards.ts';
import { runHookCall } from './hook-call.ts';
import { toServiceError } from './error-handler.ts';
import { badRequest, notFound, ServiceError, unsupportedMediaType } from './errors.ts';

/** Options of {@link uiRouter}. */
export interface UiRouterOptions {
  /**
   * The viewer's default OAuth client id (CELLCDS_SMART_CLIENT_ID), for tenants that registered
   * no `smart.clientId` of their own. Unset: only tenants with their own client id can launch;
   * for the others the launch page says so and the SMART app API refuses every call (401).
   */
  smartClientId?: string;
  /** Scopes the viewer asks for (default {@link DEFAULT_SMART_SCOPE}). */
  smartScope?: string;
  /** Directory of bundled patient Bundles for the playground (default spec/fixtures/synthea-r4). */
  patientsDir?: string;
  /** Receives validated feedback from the SMART app (the lead wires the tenant store here). */
  onFeedback?(tenantId: string, serviceId: string, items: FeedbackItem[]): void | Promise<void>;
  /** For specs: replaces the id_token verifier built from `smartClientId`. */
  idTokenVerifier?: IdTokenVerifier;
}

/** EHR launch with OpenID Connect: who the user is (fhirUser) and read access to the patient. */
export const DEFAULT_SMART_SCOPE = 'launch launch/patient openid fhirUser patient/*.read';

const UI_DIR = path.join(import.meta.dirname, 'ui');
const DEFAULT_PATIENTS_DIR = path.resolve(
  import.meta.dirname,
  '..',
  'spec',
  'fixtures',
  'synthea-r4',
);
const JSON_TYPES = ['application/json', 'application/*+json'];
const PLAYGROUND_BODY_LIMIT = 16 * 1024 * 1024;
const APP_BODY_LIMIT = 256 * 1024;
const PATIENT_CACHE_SIZE = 8;

const CSP_COMMON = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data: https:",
  "base-uri 'none'",
  "object-src 'none'",
  "form-action 'none'",
];
/** The playground talks only to cellcds and is never framed. */
const CSP_PLAYGROUND = [...CSP_COMMON, "connect-src 'self'", "frame-ancestors 'none'"].join('; ');
/**
 * The SMART pages talk to the EHR's authorization and FHIR servers (any https origin, or
 * loopback for local development) and may be embedded by the EHR, so no frame-ancestors.
 */
const CSP_APP = [
  ...CSP_COMMON,
  "connect-src 'self' https: http://127.0.0.1:* http://localhost:*",
].join('; ');

interface StaticFile {
  body: Buffer;
  type: string;
}

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.svg': 'image/svg+xml',
};

function loadFile(file: string): StaticFile {
  const type = TYPES[path.extname(file)];
  if (type === undefined) {
    throw new Error(`ui: no content type for ${file}`);
  }
  return { body: fs.readFileSync(file), type };
}

/** Vendor bundles served from node_modules under fixed names (no CDN at run time). */
function vendorFiles(): Record<string, StaticFile> {
  const require = createRequire(import.meta.url);
  const dirOf = (id: string) => path.dirname(require.resolve(id));
  return {
    'fhir-client.js': loadFile(
      path.join(dirOf('fhirclient/package.json'), 'build', 'fhir-client.pure.min.js'),
    ),
    'marked.js': loadFile(path.join(dirOf('marked/package.json'), 'lib', 'marked.esm.js')),
    'purify.js': loadFile(path.join(dirOf('dompurify'), 'purify.es.mjs')),
  };
}

const UI_ASSETS = ['style.css', 'cards.mjs', 'playground.mjs', 'launch.mjs', 'app.mjs', 'api.mjs'];
const PAGES = { playground: 'playground.html', launch: 'launch.html', app: 'app.html' } as const;

function send(res: Response, file: StaticFile, csp?: string): void {
  res.setHeader('Content-Type', file.type);
  res.setHeader('X-Content-Type-Options', 'nosniff');
  // The app's URL carries the OAuth code and state: never leak it to linked sites.
  res.setHeader('Referrer-Policy', 'no-referrer');
  res.setHeader('Cache-Control', csp === undefined ? 'no-cache' : 'no-store');
  if (csp !== undefined) {
    res.setHeader('Content-Security-Policy', csp);
  }
  res.send(file.body);
}

/** A static refusal page of the launch (no echo of the request). */
function refusalPage(text: string): StaticFile {
  return {
    type: 'text/html; charset=utf-8',
    body: Buffer.from(
      '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cellcds: launch refused</title></head>' +
        `<body><p>${text}</p></body></html>`,
    ),
  };
}

/** The launch page's answers when no launch can start (static texts, no echo). */
const REFUSAL_PAGES = {
  unknown_iss: refusalPage(
    'This launch names a FHIR server (iss) that no cellcds tenant has registered, so it was not started. ' +
      "Open the app from your EHR, or ask your administrator to register the EHR's FHIR server.",
  ),
  ambiguous: refusalPage(
    'Several organisations registered this FHIR server with different SMART client ids, so this launch ' +
      'cannot tell which one it is for. Ask your administrator to add <code>?tenant=&lt;id&gt;</code> to the ' +
      "launch URL registered in your organisation's EHR.",
  ),
  unconfigured: refusalPage(
    'The card viewer is not registered for your organisation: cellcds has no SMART client id for it, ' +
      "so this launch was not started. Ask your administrator to set the client id your EHR assigned on the tenant's " +
      'registration (smart.clientId).',
  ),
} as const;

/** Which tenant a launch is for and which client id it must use, or why it cannot start. */
type LaunchResolution =
  { kind: 'ok'; clientId: string; tenant?: string } | { kind: keyof typeof REFUSAL_PAGES };

/**
 * Launch targets of each answer of `smartLaunchTargets`, by normalized FHIR base: the page is
 * unauthenticated, so a launch costs a lookup, not a pass over every tenant.
 */
const launchIndexes = new WeakMap<readonly SmartLaunchTarget[], Map<string, SmartLaunchTarget[]>>();

/**
 * Resolves a launch from its query: `iss` (the EHR's FHIR base) must be allowlisted by an
 * active tenant (and by the `tenant` hint's, when one is given). The client id is that
 * tenant's own, else `defaultClientId`. Several tenants without a hint resolve only if they
 * would all use the same client id (the API call then chooses the tenant, as before).
 */
async function resolveLaunch(
  deps: Deps,
  defaultClientId: string | undefined,
  iss: unknown,
  hint: unknown,
): Promise<LaunchResolution> {
  const base = typeof iss === 'string' ? normalizeFhirBaseUrl(iss) : undefined;
  if (base === undefined || (hint !== undefined && typeof hint !== 'string')) {
    return { kind: 'unknown_iss' };
  }
  const targets = await deps.controlPlane.tenants.smartLaunchTargets();
  let index = launchIndexes.get(targets);
  if (!index) {
    index = new Map();
    for (const target of targets) {
      for (const url of new Set(target.fhirServers.map(normalizeFhirBaseUrl))) {
        if (url !== undefined) {
          index.set(url, [...(index.get(url) ?? []), target]);
        }
      }
    }
    launchIndexes.set(targets, index);
  }
  const all = index.get(base) ?? [];
  const matching = hint === undefined ? all : all.filter((t) => t.tenant === hint);
  const [first] = matching;
  if (first === undefined) {
    return { kind: 'unknown_iss' };
  }
  const ids = new Set(matching.map((t) => t.clientId ?? defaultClientId));
  const [clientId] = ids;
  if (ids.size > 1) {
    return { kind: 'ambiguous' };
  }
  if (clientId === undefined || clientId === '') {
    return { kind: 'unconfigured' };
  }
  return { kind: 'ok', clientId, ...(matching.length === 1 ? { tenant: first.tenant } : {}) };
}

function noStore(res: Response): void {
  res.setHeader('Cache-Control', 'no-store');
}

function paramOf(req: Request, name: string): string {
  return (req.params as Record<string, string | undefined>)[name] ?? '';
}

/** 415 unless the body is declared as JSON. */
const requireJson: RequestHandler = (req, _res, next) => {
  if (!req.is(JSON_TYPES)) {
    next(unsupportedMediaType('application/json'));
    return;
  }
  next();
};

/** Parses a body with zod; a failure is a 400 naming the first offending field. */
function parseBody<T extends z.ZodType>(schema: T, body: unknown): z.infer<T> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw badRequest('body must be a JSON object', 'body');
  }
  assertSafeJsonKeys(body);
  const r = schema.safeParse(body);
  if (!r.success) {
    const issue = r.error.issues[0];
    const field =
      issue === undefined || issue.path.length === 0 ? 'body' : issue.path.map(String).join('.');
    throw badRequest(`${field}: ${issue?.message ?? 'invalid'}`, field);
  }
  return r.data;
}

// --------------------------------------------------------------------------- playground

/** A bundled patient as the playground lists it (synthetic Synthea data, no real PHI). */
interface FixturePatient {
  file: string;
  name: string;
  gender?: string;
  age?: number;
  deceased?: boolean;
  lastEncounter?: string;
  hints: string[];
}

const ManifestSchema = z.looseObject({
  patients: z.array(
    z.looseObject({
      file: z.string(),
      gender: z.string().optional(),
      age_at_last_encounter: z.number().optional(),
      deceased: z.boolean().optional(),
      last_encounter: z.string().optional(),
      rule_hints: z.array(z.string()).optional(),
    }),
  ),
});

/** `Kyla_Zulauf_4ac8...json` -> `Kyla Zulauf`. */
function displayName(file: string): string {
  const parts = file.replace(/\.json$/, '').split('_');
  return parts.slice(0, Math.max(1, parts.length - 1)).join(' ');
}

function listFixtures(dir: string): FixturePatient[] {
  if (!fs.existsSync(dir)) {
    return [];
  }
  const files = fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.json') && f !== 'manifest.json' && !f.startsWith('.'));
  const manifestFile = path.join(dir, 'manifest.json');
  const meta = new Map<string, z.infer<typeof ManifestSchema>['patients'][number]>();
  if (fs.existsSync(manifestFile)) {
    const parsed = ManifestSchema.safeParse(JSON.parse(fs.readFileSync(manifestFile, 'utf8')));
    for (const p of parsed.success ? parsed.data.patients : []) {
      meta.set(p.file, p);
    }
  }
  return files
    .map((file): FixturePatient => {
      const m = meta.get(file);
      return {
        file,
        name: displayName(file),
        ...(m?.gender === undefined ? {} : { gender: m.gender }),
        ...(m?.age_at_last_encounter === undefined ? {} : { age: m.age_at_last_encounter }),
        ...(m?.deceased === undefined ? {} : { deceased: m.deceased }),
        ...(m?.last_encounter === undefined ? {} : { lastEncounter: m.last_encounter }),
        hints: m?.rule_hints ?? [],
      };
    })
    .sort((a, b) => a.name.localeCompare(b.name));
}

const resourceSchema = z.looseObject({
  resourceType: z
    .string()
    .regex(/^[A-Z][A-Za-z]{0,63}$/, { error: 'must be a FHIR resource type' }),
});

const EvaluateBody = z.strictObject({
  pack: z.string().min(1).max(128),
  version: z.string().min(1).max(64),
  service: z.string().min(1).max(128),
  patient: z.union([
    z.strictObject({ fixture: z.string().min(1).max(256) }),
    z.strictObject({ bundle: z.looseObject({ resourceType: z.literal('Bundle') }) }),
  ]),
  draftOrders: z.array(resourceSchema).max(50).optional(),
  // Read as a pack test's `now` (rules' one check): a date alone is 00:00 UTC of that day, so an
  // author reproducing a test with the same date gets the same answer; a time needs its offset.
  now: nowText.optional(),
});

const PlaygroundFeedbackBody = z.strictObject({
  service: z.string().min(1).max(128),
  feedback: z.array(z.unknown()),
});

/**
 * Authenticates an operator bearer token exactly as the admin API does
 * ({@link resolveOperator}), then requires `pack:read`.
 * @throws AdminAuthError (401) for a missing/unknown token; ForbiddenError (403) for a role
 *   without `pack:read` (tenant-admin, auditor).
 */
function authenticateOperator(deps: Deps): RequestHandler {
  return async (req, res, next) => {
    const site = { endpoint: 'playground', method: req.method, requestId: requestIdOf(res) };
    const principal = await resolveOperator(deps, req.headers.authorization, site);
    try {
      authorize(principal, 'pack:read');
    } catch (err) {
      if (err instanceof ForbiddenError) {
        await recordForbidden(deps, err, { principal, ...site });
      }
      throw err;
    }
    (res.locals as { principal?: Principal }).principal = principal;
    next();
  };
}

function principalOf(res: Response): Principal {
  const p = (res.locals as { principal?: Principal }).principal;
  if (!p) {
    throw new ServiceError(500, 'internal', 'internal error', { detail: 'no principal' });
  }
  return p;
}

function playgroundApi(deps: Deps, opts: UiRouterOptions): Router {
  const router = express.Router({ strict: true, caseSensitive: true });
  const json = express.json({
    limit: Math.max(deps.config.bodyLimitBytes, PLAYGROUND_BODY_LIMIT),
    type: JSON_TYPES,
    strict: true,
  });
  const patientsDir = opts.patientsDir ?? DEFAULT_PATIENTS_DIR;
  let fixtures: FixturePatient[] | undefined;
  const fixtureList = (): FixturePatient[] => (fixtures ??= listFixtures(patientsDir));
  const records = new Map<string, PatientRecord>();

  async function fixtureRecord(file: string): Promise<PatientRecord> {
    // Only names from the listing: a request never names a path.
    if (!fixtureList().some((f) => f.file === file)) {
      throw badRequest('patient.fixture: no such bundled patient', 'patient.fixture');
    }
    let record = records.get(file);
    if (record === undefined) {
      record = readPatientBundle(
        JSON.parse(await fs.promises.readFile(path.join(patientsDir, file), 'utf8')),
      );
      if (records.size >= PATIENT_CACHE_SIZE) {
        const oldest = records.keys().next().value;
        if (oldest !== undefined) {
          records.delete(oldest);
        }
      }
      records.set(file, record);
    }
    return structuredClone(record);
  }

  router.use(authenticateOperator(deps));
  router.use((_req, res, next) => {
    noStore(res);
    next();
  });

  router.get('/packs', async (_req, res) => {
    const byId = new Map<string, Array<{ version: string; hash: string; uploadedAt: string }>>();
    for (const p of await deps.controlPlane.packs.list()) {
      const list = byId.get(p.id) ?? [];
      list.push({ version: p.version, hash: p.hash, uploadedAt: p.uploadedAt });
      byId.set(p.id, list);
    }
    res.json({
      packs: [...byId.entries()]
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([id, versions]) => ({ id, versions })),
    });
  });

  router.get('/packs/:id/versions/:version', async (req, res) => {
    const compiled = await deps.directory.pack(paramOf(req, 'id'), paramOf(req, 'version'));
    const { pack } = compiled;
    res.json({
      id: pack.id,
      version: pack.version,
      hash: compiled.hash,
      title: pack.title,
      description: pack.description,
      services: pack.services.map((s) => ({
        id: s.id,
        hook: s.hook,
        ...(s.title === undefined ? {} : { title: s.title }),
        description: s.description,
      })),
    });
  });

  router.get('/patients', (_req, res) => {
    res.json({ patients: fixtureList() });
  });

  router.post('/evaluate', requireJson, json, async (req, res) => {
    const body = parseBody(EvaluateBody, req.body);
    const principal = principalOf(res);
    const compiled = await deps.directory.pack(body.pack, body.version);
    const service = compiled.pack.services.find((s) => s.id === body.service);
    if (!service) {
      throw notFound('service');
    }
    let record: PatientRecord;
    if ('fixture' in body.patient) {
      record = await fixtureRecord(body.patient.fixture);
    } else {
      try {
        record = readPatientBundle(body.patient.bundle);
      } catch (err) {
        // readPatientBundle's messages name entry indexes and types only, never values.
        throw badRequest(
          err instanceof Error ? err.message : 'not a patient Bundle',
          'patient.bundle',
        );
      }
    }
    const built = buildRequestFromRecord({
      service,
      record,
      ...(body.draftOrders === undefined ? {} : { draftOrders: body.draftOrders }),
    });
    const hookBody = { ...built, hookInstance: crypto.randomUUID() };
    if (!isHookName(service.hook)) {
      // Packs are validated at upload, so this is a bug, not bad input.
      throw new ServiceError(500, 'internal', 'internal error', {
        detail: `service hook ${service.hook}`,
      });
    }
    const hookRequest = parseHookRequest(hookBody, service.hook);
    const now = body.now === undefined ? deps.now() : parseNow(body.now);
    // An author tool: each let's value is summarized for the trace (never on the hook path).
    const result = await deps.evaluator.evaluate(
      compiled,
      service.id,
      {
        hook: hookRequest.hook,
        hookInstance: hookRequest.hookInstance,
        context: hookRequest.context,
        prefetch: built.prefetch ?? {},
        now,
      },
      { traceValues: true },
    );
    const cards = finalizeCards(answerCards(compiled, result), undefined, result.trace);
    const rules = compiled.pack.rules.filter((r) => r.service === service.id);
    await deps.controlPlane.audit.record({
      type: 'playground.evaluate',
      outcome: 'success',
      actor: actorOf(principal),
      detail: {
        pack: compiled.id,
        version: compiled.version,
        service: service.id,
        patient: 'fixture' in body.patient ? 'fixture' : 'upload',
        cards: cards.length,
      },
    });
    res.json({
      pack: { id: compiled.id, version: compiled.version, hash: compiled.hash },
      service: {
        id: service.id,
        hook: service.hook,
        ...(service.title === undefined ? {} : { title: service.title }),
      },
      now: now.toISOString(),
      request: hookBody,
      response: { cards },
      trace: result.trace,
      lets: result.lets ?? [],
      durationMs: result.durationMs,
      rules: rules.map((r) => ({
        id: r.id,
        ...(r.title === undefined ? {} : { title: r.title }),
        ...(r.description === undefined ? {} : { description: r.description }),
        when: r.when,
      })),
    });
  });

  router.post('/feedback', requireJson, json, (req, res) => {
    const body = parseBody(PlaygroundFeedbackBody, req.body);
    const items = parseFeedbackRequest({ feedback: body.feedback });
    // The playground stores nothing: the feedback is validated and echoed for the author.
    res.json({ service: body.service, stored: false, feedback: items });
  });

  return router;
}

// --------------------------------------------------------------------------- SMART app

const FhirAuthorizationBody = z.looseObject({
  access_token: z
    .string()
    .min(1)
    .max(16 * 1024),
  token_type: z.string().regex(/^[Bb]earer$/, { error: "must be 'Bearer'" }),
  expires_in: z.number().int().min(0).optional(),
  scope: z.string().min(1).max(4096).optional(),
  patient: z.string().min(1).max(64).optional(),
});

const AppCallBody = z.strictObject({
  fhirServer: z.string().min(1).max(2048),
  tenant: z.string().min(1).max(64).optional(),
  fhirAuthorization: FhirAuthorizationBody,
  context: z.strictObject({
    patientId: z.string().min(1).max(64),
    encounterId: z.string().min(1).max(64).optional(),
  }),
});

const AppFeedbackBody = z.strictObject({
  fhirServer: z.string().min(1).max(2048),
  tenant: z.string().min(1).max(64).optional(),
  service: z.string().min(1).max(128),
  feedback: z.array(z.unknown()),
});

const FHIR_USER =
  /(?:^|\/)(Practitioner|PractitionerRole|Patient|RelatedPerson)\/([A-Za-z0-9\-.]{1,64})$/;

/** The hook's `userId` from the verified `fhirUser` claim. @throws AuthError when unusable. */
function userIdOf(identity: AppIdentity): string {
  const m = identity.fhirUser === undefined ? null : FHIR_USER.exec(identity.fhirUser);
  if (!m?.[1] || !m[2]) {
    throw new AuthError(
      'missing_claim',
      'fhirUser (Practitioner, PractitionerRole, Patient or RelatedPerson)',
    );
  }
  return `${m[1]}/${m[2]}`;
}

/**
 * What the id_token verifier needs from a body to choose the tenant, read without trusting or
 * validating the rest: the caller is authenticated before its body is parsed.
 */
function authContextOf(body: unknown): IdTokenContext {
  const b =
    typeof body === 'object' && body !== null && !Array.isArray(body)
      ? (body as Record<string, unknown>)
      : {};
  return {
    fhirServer: typeof b.fhirServer === 'string' ? b.fhirServer : '',
    ...(typeof b.tenant === 'string' ? { tenant: b.tenant } : {}),
  };
}

function appApi(deps: Deps, opts: UiRouterOptions): Router {
  const router = express.Router({ strict: true, caseSensitive: true });
  const json = express.json({ limit: APP_BODY_LIMIT, type: JSON_TYPES, strict: true });
  const clientId = opts.smartClientId === '' ? undefined : opts.smartClientId;
  const scope = opts.smartScope ?? DEFAULT_SMART_SCOPE;
  // `aud` must be the client id of the tenant the token speaks for: its own, else the default.
  // With neither, that tenant's every call is refused (fail closed).
  const verifier =
    opts.idTokenVerifier ??
    createIdTokenVerifier({
      controlPlane: deps.controlPlane,
      clientIds: clientId === undefined ? [] : [clientId],
      allowNoDefault: true,
      algorithms: [...deps.config.jwtAlgorithms],
      maxLifetimeSeconds: deps.config.jwtMaxLifetimeSeconds,
      now: () => deps.now(),
    });

  async function authenticate(
    req: Request,
    res: Response,
    endpoint: string,
    context: IdTokenContext,
  ): Promise<AppIdentity> {
    const where = { endpoint, requestId: requestIdOf(res) };
    const identity = await verifier
      .verify(req.headers.authorization, context)
      .then((id) => {
        userIdOf(id); // a token without a usable fhirUser is refused (and audited) like any other
        return id;
      })
      .catch((err: unknown) => recordAuthFailure(deps, err, 'app', where));
    // Residency, exactly as for CDS Hooks calls.
    await assertServedHere(deps, identity.tenant, where);
    return identity;
  }

  router.use((_req, res, next) => {
    noStore(res);
    next();
  });

  // With `iss` (and the optional `tenant` hint) of a launch: the client id of that launch's
  // tenant. Without: the deployment's default, as before per-tenant client ids.
  router.get('/config', async (req, res) => {
    const { iss, tenant } = req.query;
    if (iss === undefined) {
      res.json(
        clientId === undefined ? { configured: false } : { configured: true, clientId, scope },
      );
      return;
    }
    const launch = await resolveLaunch(deps, clientId, iss, tenant);
    switch (launch.kind) {
      case 'ok':
        res.json({
          configured: true,
          clientId: launch.clientId,
          scope,
          ...(launch.tenant === undefined ? {} : { tenant: launch.tenant }),
        });
        return;
      case 'unconfigured':
        res.json({ configured: false });
        return;
      case 'unknown_iss':
        throw badRequest('iss: no active tenant registers this FHIR server', 'iss');
      case 'ambiguous':
        throw badRequest(
          'tenant: several tenants register this FHIR server with different client ids; the launch must name the tenant',
          'tenant',
        );
    }
  });

  router.post('/patient-view', requireJson, json, async (req, res) => {
    const started = performance.now();
    const identity = await authenticate(req, res, '/app/api/patient-view', authContextOf(req.body));
    const body = parseBody(AppCallBody, req.body);
    const { tenant } = identity;
    const { patientId, encounterId } = body.context;
    const auth = body.fhirAuthorization;
    if (auth.patient !== undefined && auth.patient !== patientId) {
      throw badRequest('context.patientId must be the patient of the launch', 'context.patientId');
    }
    const services = [...(await deps.directory.services(tenant)).values()].filter(
      (r) => r.service.hook === 'patient-view',
    );
    const out = [];
    for (const resolved of services) {
      const hookBody = {
        hook: 'patient-view',
        hookInstance: crypto.randomUUID(),
        fhirServer: body.fhirServer,
        fhirAuthorization: {
          access_token: auth.access_token,
          token_type: 'Bearer',
          expires_in: auth.expires_in ?? 0,
          scope: auth.scope ?? 'launch/patient',
          subject: identity.clientId,
          patient: patientId,
        },
        context: {
          userId: userIdOf(identity),
          patientId,
          ...(encounterId === undefined ? {} : { encounterId }),
        },
      };
      const request = parseHookRequest(hookBody, 'patient-view');
      try {
        const { cards } = await runHookCall(deps, tenant, resolved, request);
        out.push({
          id: resolved.service.id,
          ...(resolved.service.title === undefined ? {} : { title: resolved.service.title }),
          cards,
        });
      } catch (err) {
        // One service's missing data must not hide the others' cards: report it per service.
        const se = toServiceError(err);
        if (se.status >= 500) {
          throw err;
        }
        out.push({
          id: resolved.service.id,
          ...(resolved.service.title === undefined ? {} : { title: resolved.service.title }),
          cards: [],
          error: { code: se.code, message: se.message },
        });
      }
    }
    deps.log.info(
      {
        requestId: requestIdOf(res),
        tenant: tenant.id,
        services: out.length,
        cardCount: out.reduce((n, s) => n + s.cards.length, 0),
        failed: out.filter((s) => 'error' in s).length,
        ms: Math.round(performance.now() - started),
      },
      'app patient-view',
    );
    res.json({ tenant: tenant.id, services: out });
  });

  router.post('/feedback', requireJson, json, async (req, res) => {
    const identity = await authenticate(req, res, '/app/api/feedback', authContextOf(req.body));
    const body = parseBody(AppFeedbackBody, req.body);
    const resolved = await deps.directory.service(identity.tenant, body.service);
    if (resolved.service.hook !== 'patient-view') {
      throw new ServiceError(404, 'not_found', 'no such CDS service');
    }
    const items = parseFeedbackRequest({ feedback: body.feedback });
    await opts.onFeedback?.(identity.tenant.id, resolved.service.id, items);
    deps.log.info(
      {
        requestId: requestIdOf(res),
        tenant: identity.tenant.id,
        service: resolved.service.id,
        feedbackCount: items.length,
      },
      'app feedback',
    );
    res.json({ received: items.length });
  });

  return router;
}

// --------------------------------------------------------------------------- router

/**
 * Builds the card viewer router, mounted at `/`: pages `/playground`, `/app/launch`, `/app/`;
 * assets `/ui/*` and `/ui/vendor/*`; APIs `/playground/api/*` and `/app/api/*`.
 * @throws Error at creation if a UI or vendor file is missing (fail fast at boot).
 */
export function uiRouter(deps: Deps, opts: UiRouterOptions = {}): Router {
  const router = express.Router({ strict: true, caseSensitive: true });
  const assets = new Map(UI_ASSETS.map((f) => [f, loadFile(path.join(UI_DIR, f))]));
  const vendor = new Map(Object.entries(vendorFiles()));
  const pages = {
    playground: loadFile(path.join(UI_DIR, PAGES.playground)),
    launch: loadFile(path.join(UI_DIR, PAGES.launch)),
    app: loadFile(path.join(UI_DIR, PAGES.app)),
  };

  router.get('/ui/vendor/:file', (req, res) => {
    const file = vendor.get(paramOf(req, 'file'));
    if (!file) {
      throw notFound('file');
    }
    send(res, file);
  });
  router.get('/ui/:file', (req, res) => {
    const file = assets.get(paramOf(req, 'file'));
    if (!file) {
      throw notFound('file');
    }
    send(res, file);
  });

  router.get('/playground', (_req, res) => {
    send(res, pages.playground, CSP_PLAYGROUND);
  });
  router.use('/playground/api', playgroundApi(deps, opts));

  router.get('/app', (req, res) => {
    const q = req.originalUrl.indexOf('?');
    res.redirect(302, `/app/${q < 0 ? '' : req.originalUrl.slice(q)}`);
  });
  router.get('/app/', (_req, res) => {
    send(res, pages.app, CSP_APP);
  });
  const defaultClientId = opts.smartClientId === '' ? undefined : opts.smartClientId;
  router.get('/app/launch', async (req, res) => {
    // The launch sends the browser to the authorization server that `iss` names (fhirclient
    // reads its .well-known/smart-configuration): only an EHR FHIR server some active tenant
    // allowlists may be that, else a link to this host could open any sign-in page (phishing).
    // That tenant must have a client id (its own or the default) and be the only candidate.
    // No iss at all: the page itself says the launch needs one.
    if (req.query['iss'] !== undefined) {
      const launch = await resolveLaunch(
        deps,
        defaultClientId,
        req.query['iss'],
        req.query['tenant'],
      );
      if (launch.kind !== 'ok') {
        res.status(400);
        send(res, REFUSAL_PAGES[launch.kind], CSP_APP);
        return;
      }
    }
    send(res, pages.launch, CSP_APP);
  });
  router.use('/app/api', appApi(deps, opts));

  return router;
}
