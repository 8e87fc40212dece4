/**
 * A CDS client (EHR) for specs: real keys generated with node-jose, a public JWK Set to
 * register, tokens signed the way an EHR signs them, and forgeries an attacker would try.
 * Also a tiny JWKS HTTP server (Express on 127.0.0.1:0) that counts requests.
 */
import crypto from 'node:crypto';
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import express from 'express';
import nodeJose from 'node-jose';

export type TestAlg = 'ES384' | 'RS384' | 'ES256' | 'RS256';

interface KeyParams {
  kty: 'EC' | 'RSA';
  size: string | number;
}

const KEY_PARAMS: Record<TestAlg, KeyParams> = {
  ES384: { kty: 'EC', size: 'P-384' },
  ES256: { kty: 'EC', size: 'P-256' },
  RS384: { kty: 'RSA', size: 2048 },
  RS256: { kty: 'RSA', size: 2048 },
};

export interface SignOptions {
  /** Header alg; selects the issuer's key of that alg (added on demand). */
  alg?: TestAlg;
  /** Header kid (default: the signing key's kid). The signing key does not change. */
  kid?: string;
  /** Sign with the issuer's key that has this kid (default: by `alg`, else the first key). */
  signingKid?: string;
  /** Header typ (default 'JWT'). */
  typ?: string;
  jku?: string;
  /** Raw header overrides; an `undefined` value removes the field. */
  header?: Record<string, unknown>;
}

export interface TestIssuerOptions {
  iss: string;
  /** Algorithm of the first key (default ES384). */
  alg?: TestAlg;
  kid?: string;
  /** Default `aud` claim. */
  aud?: string | string[];
  /** Default `tenant` claim. */
  tenant?: string;
  /** Clock for iat/exp (default: real time). */
  now?: () => Date;
}

type Claims = Record<string, unknown>;

function b64url(value: string | Buffer): string {
  return Buffer.from(value).toString('base64url');
}

function withoutUndefined(obj: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) {
    if (v !== undefined) {
      out[k] = v;
    }
  }
  return out;
}

async function generateKey(alg: TestAlg, kid: string): Promise<nodeJose.JWK.Key> {
  const { kty, size } = KEY_PARAMS[alg];
  const store = nodeJose.JWK.createKeyStore();
  return store.generate(kty, size, { kid, alg, use: 'sig' });
}

async function signCompact(
  key: nodeJose.JWK.Key,
  header: Claims,
  payload: Claims,
): Promise<string> {
  const signer = nodeJose.JWS.createSign({ format: 'compact', fields: header }, {
    key,
    reference: false,
  } as unknown as nodeJose.JWK.Key);
  return (await signer.update(JSON.stringify(payload), 'utf8').final()) as unknown as string;
}

/** An EHR that signs CDS Hooks JWTs with keys it generated. */
export class TestIssuer {
  readonly iss: string;
  private readonly keys: nodeJose.JWK.Key[] = [];
  private readonly defaults: { aud?: string | string[]; tenant?: string };
  private readonly now: () => Date;

  private constructor(opts: TestIssuerOptions) {
    this.iss = opts.iss;
    this.defaults = withoutUndefined({ aud: opts.aud, tenant: opts.tenant });
    this.now = opts.now ?? (() => new Date());
  }

  /** Creates an issuer with one fresh key (ES384 unless `alg` says otherwise). */
  static async create(opts: TestIssuerOptions): Promise<TestIssuer> {
    const issuer = new TestIssuer(opts);
    await issuer.addKey(opts.alg ?? 'ES384', opts.kid);
    return issuer;
  }

  /** Generates another key (e.g. for rotation); returns its kid. */
  async addKey(alg: TestAlg, kid?: string): Promise<string> {
    const key = await generateKey(alg, kid ?? `${alg.toLowerCase()}-${crypto.randomUUID()}`);
    this.keys.push(key);
    return key.kid;
  }

  /** The kid of the first key of `alg` (or of the first key). */
  kid(alg?: TestAlg): string {
    return this.key(alg).kid;
  }

  /** The public JWK Set to register (no private members). */
  publicJwks(): { keys: Array<Record<string, unknown>> } {
    return { keys: this.keys.map((k) => k.toJSON(false) as Record<string, unknown>) };
  }

  /** Public JWK Set of only some kids (to simulate a JWKS that lags a rotation). */
  publicJwksOf(kids: string[]): { keys: Array<Record<string, unknown>> } {
    return { keys: this.publicJwks().keys.filter((k) => kids.includes(k.kid as string)) };
  }

  private key(alg?: TestAlg): nodeJose.JWK.Key {
    const key = alg ? this.keys.find((k) => k.alg === alg) : this.keys[0];
    if (!key) {
      throw new Error(`test issuer has no ${alg ?? ''} key`);
    }
    return key;
  }

  /** Standard claims: iss, fresh jti, iat = now, exp = now + 300, plus defaults, then overrides. */
  claims(overrides: Claims = {}): Claims {
    const iat = Math.floor(this.now().getTime() / 1000);
    return withoutUndefined({
      iss: this.iss,
      ...this.defaults,
      iat,
      exp: iat + 300,
      jti: crypto.randomUUID(),
      ...overrides,
    });
  }

  private header(key: nodeJose.JWK.Key, opts: SignOptions, alg: string): Claims {
    return withoutUndefined({
      alg,
      typ: opts.typ ?? 'JWT',
      kid: opts.kid ?? key.kid,
      jku: opts.jku,
      ...opts.header,
    });
  }

  /** Signs a token. `claimsOverrides` values of `undefined` remove the claim. */
  async sign(claimsOverrides: Claims = {}, opts: SignOptions = {}): Promise<string> {
    if (opts.alg && !this.keys.some((k) => k.alg === opts.alg)) {
      await this.addKey(opts.alg);
    }
    const key = opts.signingKid === undefined ? this.key(opts.alg) : this.keyByKid(opts.signingKid);
    return signCompact(key, this.header(key, opts, key.alg), this.claims(claimsOverrides));
  }

  private keyByKid(kid: string): nodeJose.JWK.Key {
    const key = this.keys.find((k) => k.kid === kid);
    if (!key) {
      throw new Error(`test issuer has no key ${kid}`);
    }
    return key;
  }

  /** Attack: an unsigned token (`alg: none`, empty signature). */
  unsigned(claimsOverrides: Claims = {}): string {
    const header = { alg: 'none', typ: 'JWT', kid: this.kid() };
    return `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(this.claims(claimsOverrides)))}.`;
  }

  /**
   * Attack: HS256 "signed" with the issuer's PUBLIC key as the HMAC secret (the classic
   * algorithm-confusion forgery), built with node's crypto as an attacker would.
   */
  hs256WithPublicKey(claimsOverrides: Claims = {}, secretForm: 'pem' | 'jwk' = 'pem'): string {
    const key = this.key();
    const secret = secretForm === 'pem' ? key.toPEM(false) : JSON.stringify(key.toJSON(false));
    const header = { alg: 'HS256', typ: 'JWT', kid: key.kid };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(this.claims(claimsOverrides)))}`;
    const sig = crypto.createHmac('sha256', secret).update(input).digest('base64url');
    return `${input}.${sig}`;
  }

  /** Attack: signed by a different key that claims this issuer's kid. */
  async signWithForeignKey(claimsOverrides: Claims = {}, opts: SignOptions = {}): Promise<string> {
    const own = this.key(opts.alg);
    const foreign = await generateKey(own.alg as TestAlg, own.kid);
    return signCompact(
      foreign,
      this.header(foreign, opts, foreign.alg),
      this.claims(claimsOverrides),
    );
  }
}

/** A JWKS endpoint on 127.0.0.1:0 serving a settable key set and counting requests per path. */
export interface JwksServer {
  /** Base URL, e.g. `http://127.0.0.1:41234`. */
  readonly origin: string;
  /** URL of `path` (default `/jwks`). */
  url(path?: string): string;
  /** Requests seen for `path`, or for all paths. */
  count(path?: string): number;
  setJwks(jwks: unknown): void;
  /** Replaces the handler (status, delay, redirect, oversized body...). */
  setHandler(handler: express.RequestHandler | undefined): void;
  close(): Promise<void>;
}

/** Starts a JWKS server. Every path serves the current set unless a handler is set. */
export async function startJwksServer(jwks: unknown = { keys: [] }): Promise<JwksServer> {
  let current = jwks;
  let handler: express.RequestHandler | undefined;
  const counts = new Map<string, number>();
  const app = express();
  app.use((req, res, next) => {
    counts.set(req.path, (counts.get(req.path) ?? 0) + 1);
    if (handler) {
      handler(req, res, next);
      return;
    }
    res.type('application/json').send(JSON.stringify(current));
  });
  const server: http.Server = await new Promise((resolve) => {
    const s = app.listen(0, '127.0.0.1', () => {
      resolve(s);
    });
  });
  const { port } = server.address() as AddressInfo;
  const origin = `http://127.0.0.1:${port}`;
  return {
    origin,
    url: (path = '/jwks') => `${origin}${path}`,
    count: (path?: string) =>
      path === undefined
        ? [...counts.values()].reduce((a, b) => a + b, 0)
        : (counts.get(path) ?? 0),
    setJwks: (next) => {
      current = next;
    },
    setHandler: (next) => {
      handler = next;
    },
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.closeAllConnections();
        server.close((err) => {
          if (err) {
            reject(err);
          } else {
            resolve();
          }
        });
      }),
  };
}
