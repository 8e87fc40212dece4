/**
 * A small SMART on FHIR EHR for specs: an authorization server and a FHIR endpoint on one
 * Express app at 127.0.0.1 port 0.
 *
 * - `GET {fhirBase}/.well-known/smart-configuration`: endpoints, PKCE S256, EHR launch.
 * - `GET /auth/authorize`: auto-approves, after checking response_type, client_id, a registered
 *   redirect_uri, `aud` = the FHIR base, a `launch` it issued, state, and a PKCE S256
 *   challenge (required). Redirects with `code` and `state`.
 * - `POST /auth/token`: exchanges a code once, checking redirect_uri, client_id and the PKCE
 *   verifier; returns access_token, patient, scope and an id_token signed with its own key
 *   (iss = the server's issuer, aud = client_id, sub, fhirUser).
 * - `GET /auth/jwks`: its public keys.
 * - `{fhirBase}/...`: the patient's data from `startFhirServer` (spec/helpers/fhir-server.ts),
 *   reached only with an access token this server issued; every request is recorded.
 *
 * CORS is open, as a browser app on another origin calls the discovery, token and FHIR URLs.
 */
import crypto from 'node:crypto';
import type { AddressInfo } from 'node:net';
import express from 'express';
import type { NextFunction, Request, Response } from 'express';
import { startFhirServer } from './fhir-server.ts';
import type { TestFhirServer } from './fhir-server.ts';
import { TestIssuer } from './test-issuer.ts';

export interface SmartServerOptions {
  clientId: string;
  redirectUris: string[];
  patientFile?: string;
}

export interface RecordedFhirRequest {
  url: string;
  authorization: string | undefined;
  /** Tells cellcds' server-side fetches (Node) from the browser's. */
  userAgent: string | undefined;
}

export interface SmartServer {
  origin: string;
  /** The OpenID issuer of its id_tokens. */
  issuer: string;
  /** The FHIR base URL (the SMART `iss` launch parameter). */
  fhirBaseUrl: string;
  clientId: string;
  patientId: string;
  practitionerId: string;
  /** Signs its id_tokens (also usable by specs to sign id_tokens directly). */
  signer: TestIssuer;
  fhir: TestFhirServer;
  /** Creates a launch context and returns the app's launch URL with `iss` and `launch`. */
  launchUrl(appLaunchUrl: string, extra?: Record<string, string>): string;
  /** Access tokens issued so far. */
  accessTokens: string[];
  /** Every request to the FHIR endpoint (path and Authorization header). */
  fhirRequests: RecordedFhirRequest[];
  /** Authorize requests seen, with their query parameters. */
  authorizeRequests: Array<Record<string, string>>;
  /** Claims overrides for the next id_tokens (e.g. a wrong `aud`); `undefined` removes a claim. */
  idTokenClaims: Record<string, unknown>;
  close(): Promise<void>;
}

interface PendingCode {
  clientId: string;
  redirectUri: string;
  challenge: string;
  scope: string;
  patient: string;
}

function s256(verifier: string): string {
  return crypto.createHash('sha256').update(verifier, 'ascii').digest('base64url');
}

function cors(req: Request, res: Response, next: NextFunction): void {
  res.setHeader('Access-Control-Allow-Origin', '*');
  res.setHeader('Access-Control-Allow-Headers', 'Authorization, Content-Type, Accept');
  res.setHeader('Access-Control-Allow-Methods', 'GET, POST, OPTIONS');
  if (req.method === 'OPTIONS') {
    res.status(204).end();
    return;
  }
  next();
}

function oauthError(res: Response, status: number, error: string, description: string): void {
  res.status(status).json({ error, error_description: description });
}

export async function startSmartServer(opts: SmartServerOptions): Promise<SmartServer> {
  const fhir = await startFhirServer({
    token: `inner-${crypto.randomBytes(12).toString('hex')}`,
    ...(opts.patientFile === undefined ? {} : { patientFile: opts.patientFile }),
  });
  const practitioner = fhir.record.resources.find((r) => r.resourceType === 'Practitioner');
  const practitionerId =
    typeof practitioner?.id === 'string' ? practitioner.id : 'smart-practitioner';
  const launches = new Map<string, { patient: string }>();
  const codes = new Map<string, PendingCode>();
  const accessTokens: string[] = [];
  const fhirRequests: RecordedFhirRequest[] = [];
  const authorizeRequests: Array<Record<string, string>> = [];
  const idTokenClaims: Record<string, unknown> = {};

  const app = express();
  app.disable('x-powered-by');
  app.use(cors);
  let origin = '';
  const fhirPath = '/fhir';
  const signerHolder: { signer?: TestIssuer } = {};

  app.get(`${fhirPath}/.well-known/smart-configuration`, (_req, res) => {
    res.json({
      issuer: origin,
      authorization_endpoint: `${origin}/auth/authorize`,
      token_endpoint: `${origin}/auth/token`,
      jwks_uri: `${origin}/auth/jwks`,
      grant_types_supported: ['authorization_code'],
      response_types_supported: ['code'],
      code_challenge_methods_supported: ['S256'],
      token_endpoint_auth_methods_supported: ['none'],
      scopes_supported: ['openid', 'fhirUser', 'launch', 'launch/patient', 'patient/*.read'],
      capabilities: [
        'launch-ehr',
        'client-public',
        'context-ehr-patient',
        'sso-openid-connect',
        'permission-patient',
      ],
    });
  });

  app.get('/auth/authorize', (req, res) => {
    const q = Object.fromEntries(
      Object.entries(req.query).filter((e): e is [string, string] => typeof e[1] === 'string'),
    );
    authorizeRequests.push(q);
    if (q.response_type !== 'code' || q.client_id !== opts.clientId) {
      oauthError(res, 400, 'unauthorized_client', 'unknown client or response_type');
      return;
    }
    if (q.redirect_uri === undefined || !opts.redirectUris.includes(q.redirect_uri)) {
      oauthError(res, 400, 'invalid_request', 'redirect_uri is not registered');
      return;
    }
    if (q.aud !== `${origin}${fhirPath}`) {
      oauthError(res, 400, 'invalid_request', 'aud is not this FHIR server');
      return;
    }
    const launch = q.launch === undefined ? undefined : launches.get(q.launch);
    if (!launch || q.state === undefined || q.state === '') {
      oauthError(res, 400, 'invalid_request', 'unknown launch or missing state');
      return;
    }
    if (q.code_challenge_method !== 'S256' || !q.code_challenge || q.code_challenge.length < 43) {
      oauthError(res, 400, 'invalid_request', 'PKCE S256 is required');
      return;
    }
    const code = crypto.randomBytes(24).toString('base64url');
    codes.set(code, {
      clientId: q.client_id,
      redirectUri: q.redirect_uri,
      challenge: q.code_challenge,
      scope: q.scope ?? '',
      patient: launch.patient,
    });
    const target = new URL(q.redirect_uri);
    target.searchParams.set('code', code);
    target.searchParams.set('state', q.state);
    res.redirect(302, target.href);
  });

  app.post('/auth/token', express.urlencoded({ extended: false }), async (req, res) => {
    const b = req.body as Record<string, string | undefined>;
    const pending = b.code === undefined ? undefined : codes.get(b.code);
    if (b.grant_type !== 'authorization_code' || !pending || b.code === undefined) {
      oauthError(res, 400, 'invalid_grant', 'unknown code');
      return;
    }
    codes.delete(b.code);
    if (b.redirect_uri !== pending.redirectUri || b.client_id !== pending.clientId) {
      oauthError(res, 400, 'invalid_grant', 'redirect_uri or client_id differs');
      return;
    }
    if (b.code_verifier === undefined || s256(b.code_verifier) !== pending.challenge) {
      oauthError(res, 400, 'invalid_grant', 'PKCE verification failed');
      return;
    }
    const accessToken = crypto.randomBytes(24).toString('base64url');
    accessTokens.push(accessToken);
    const scopes = pending.scope.split(' ');
    const body: Record<string, unknown> = {
      access_token: accessToken,
      token_type: 'Bearer',
      expires_in: 3600,
      scope: pending.scope,
      patient: pending.patient,
      need_patient_banner: true,
    };
    const signer = signerHolder.signer;
    if (signer && scopes.includes('openid')) {
      body.id_token = await signer.sign({
        aud: pending.clientId,
        sub: `user-${practitionerId}`,
        ...(scopes.includes('fhirUser')
          ? { fhirUser: `${origin}${fhirPath}/Practitioner/${practitionerId}` }
          : {}),
        ...idTokenClaims,
      });
    }
    res.setHeader('Cache-Control', 'no-store');
    res.json(body);
  });

  app.get('/auth/jwks', (_req, res) => {
    res.json(signerHolder.signer?.publicJwks() ?? { keys: [] });
  });

  // FHIR facade: our access tokens only; forwarded to the patient's FHIR server.
  app.use(fhirPath, async (req, res) => {
    fhirRequests.push({
      url: req.originalUrl,
      authorization: req.get('authorization'),
      userAgent: req.get('user-agent'),
    });
    const m = /^Bearer (.+)$/.exec(req.get('authorization') ?? '');
    if (!m?.[1] || !accessTokens.includes(m[1])) {
      res
        .status(401)
        .set('WWW-Authenticate', 'Bearer')
        .json({
          resourceType: 'OperationOutcome',
          issue: [{ severity: 'error', code: 'login', diagnostics: 'unknown access token' }],
        });
      return;
    }
    const upstream = await fetch(`${fhir.baseUrl}${req.url}`, {
      headers: { authorization: `Bearer ${fhir.token}`, accept: 'application/fhir+json' },
      redirect: 'manual',
    });
    const text = (await upstream.text()).replaceAll(fhir.baseUrl, `${origin}${fhirPath}`);
    res.status(upstream.status).type('application/fhir+json').send(text);
  });

  const server = app.listen(0, '127.0.0.1');
  await new Promise<void>((resolve, reject) => {
    server.once('listening', resolve);
    server.once('error', reject);
  });
  const { port } = server.address() as AddressInfo;
  origin = `http://127.0.0.1:${port}`;
  const signer = await TestIssuer.create({ iss: origin, alg: 'RS256' });
  signerHolder.signer = signer;

  return {
    origin,
    issuer: origin,
    fhirBaseUrl: `${origin}${fhirPath}`,
    clientId: opts.clientId,
    patientId: fhir.record.patientId,
    practitionerId,
    signer,
    fhir,
    launchUrl(appLaunchUrl, extra = {}) {
      const launch = crypto.randomBytes(12).toString('hex');
      launches.set(launch, { patient: fhir.record.patientId });
      const url = new URL(appLaunchUrl);
      url.searchParams.set('iss', `${origin}${fhirPath}`);
      url.searchParams.set('launch', launch);
      for (const [k, v] of Object.entries(extra)) {
        url.searchParams.set(k, v);
      }
      return url.href;
    },
    accessTokens,
    fhirRequests,
    authorizeRequests,
    idTokenClaims,
    async close() {
      server.closeAllConnections();
      await new Promise<void>((resolve) =>
        server.close(() => {
          resolve();
        }),
      );
      await fhir.close();
    },
  };
}
