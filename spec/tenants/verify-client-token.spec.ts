import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';
import {
  AuthError,
  createJwksFetcher,
  createMemoryReplayCache,
  createTokenVerifier,
  InvalidInputError,
  openControlPlane,
  RedisClockSkewError,
  RedisHistoryLostError,
  RedisUnsupportedError,
  RedisVersionError,
  RETRYABLE_AUTH_FAILURES,
} from '../../tenants/index.ts';
import type { AuthFailureReason, ControlPlane, TokenVerifier } from '../../tenants/index.ts';
import { startJwksServer, TestIssuer } from '../helpers/test-issuer.ts';
import type { JwksServer, SignOptions } from '../helpers/test-issuer.ts';

const AUD = 'https://cds.example.org/cds-services/med-safety';
const OTHER_SERVICE = 'https://cds.example.org/cds-services/renal-dosing';
const DISCOVERY = 'https://cds.example.org/cds-services';
const fixtures = path.join(
  path.dirname(fileURLToPath(import.meta.url)),
  '..',
  'fixtures',
  'cds-hooks-spec',
  '2.0',
);

async function refusal(promise: Promise<unknown>): Promise<AuthError> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof AuthError) {
      return err;
    }
    throw err;
  }
  throw new Error('expected an AuthError');
}

describe('tenants/ createTokenVerifier (CDS client JWTs)', () => {
  let nowMs = Date.parse('2025-06-01T12:00:00Z');
  const clock = (): Date => new Date(nowMs);

  let issuerA: TestIssuer;
  let issuerB: TestIssuer;
  let shared: TestIssuer;
  let suspendedIssuer: TestIssuer;
  let uriIssuer: TestIssuer;
  let jkuServer: JwksServer;
  let uriServer: JwksServer;
  let deadUrl: string;

  let dir: string;
  let cp: ControlPlane;
  let replay: ReturnType<typeof createMemoryReplayCache>;
  let failures: Array<{ reason: AuthFailureReason; info: { iss?: string; tenant?: string } }>;
  let verifier: TokenVerifier;

  before(async () => {
    issuerA = await TestIssuer.create({
      iss: 'https://ehr-a.example.org',
      aud: AUD,
      tenant: 'tenant-a',
      now: clock,
    });
    for (const alg of ['RS384', 'ES256', 'RS256'] as const) {
      await issuerA.addKey(alg);
    }
    issuerB = await TestIssuer.create({
      iss: 'https://ehr-b.example.org',
      aud: AUD,
      tenant: 'tenant-b',
      now: clock,
    });
    shared = await TestIssuer.create({
      iss: 'https://shared-ehr.example.org',
      aud: AUD,
      now: clock,
    });
    suspendedIssuer = await TestIssuer.create({
      iss: 'https://ehr-s.example.org',
      aud: AUD,
      now: clock,
    });
    uriIssuer = await TestIssuer.create({ iss: 'https://ehr-u.example.org', aud: AUD, now: clock });
    jkuServer = await startJwksServer(issuerA.publicJwks());
    uriServer = await startJwksServer(uriIssuer.publicJwks());
    const dead = await startJwksServer();
    deadUrl = dead.url('/jwks');
    await dead.close();
  });

  after(async () => {
    await jkuServer.close();
    await uriServer.close();
  });

  function buildVerifier(
    extra: Partial<Parameters<typeof createTokenVerifier>[0]> = {},
  ): TokenVerifier {
    return createTokenVerifier({
      controlPlane: cp,
      replayCache: replay,
      jwks: createJwksFetcher({ now: clock, timeoutMs: 2000 }),
      now: clock,
      onFailure: (reason, info) => failures.push({ reason, info }),
      ...extra,
    });
  }

  beforeEach(async () => {
    nowMs = Date.parse('2025-06-01T12:00:00Z');
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
    cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite'), now: clock });
    const t = (id: string, issuers: unknown[], sharedIssuer = false) =>
      cp.tenants.create({
        id,
        name: id,
        region: 'eu-west',
        issuers: issuers as never,
        sharedIssuer,
      });
    await t('tenant-a', [
      { iss: issuerA.iss, jwks: issuerA.publicJwks(), jku: [jkuServer.url('/a-keys')] },
    ]);
    await t('tenant-b', [{ iss: issuerB.iss, jwks: issuerB.publicJwks() }]);
    await t('tenant-c', [{ iss: shared.iss, jwks: shared.publicJwks() }]);
    await t('tenant-d', [{ iss: shared.iss, jwks: shared.publicJwks() }], true);
    await t('tenant-s', [{ iss: suspendedIssuer.iss, jwks: suspendedIssuer.publicJwks() }]);
    await cp.tenants.update('tenant-s', { status: 'suspended' });
    await t('tenant-u', [{ iss: uriIssuer.iss, jwksUri: uriServer.url('/u-keys') }]);
    await t('tenant-x', [{ iss: 'https://ehr-x.example.org', jwksUri: deadUrl }]);
    uriServer.setJwks(uriIssuer.publicJwks());
    replay = createMemoryReplayCache({ now: clock });
    failures = [];
    verifier = buildVerifier();
  });

  afterEach(async () => {
    await cp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const bearer = (jwt: string): string => `Bearer ${jwt}`;
  const nowS = (): number => Math.floor(nowMs / 1000);

  describe('accepts', () => {
    it('a well-formed token and returns the registered tenant', async () => {
      const jwt = await issuerA.sign();
      const id = await verifier.verify(bearer(jwt), AUD);
      expect(id.tenant).to.deep.equal(await cp.tenants.get('tenant-a'));
      expect(id.iss).to.equal(issuerA.iss);
      expect(id.kid).to.equal(issuerA.kid('ES384'));
      expect(id.exp).to.equal(nowS() + 300);
      expect(id.jti).to.be.a('string');
      expect(replay.size()).to.equal(1);
      expect(failures).to.deep.equal([]);
    });

    for (const alg of ['ES384', 'RS384', 'ES256', 'RS256'] as const) {
      it(`a token signed with ${alg}`, async () => {
        const id = await verifier.verify(bearer(await issuerA.sign({}, { alg })), AUD);
        expect(id.kid).to.equal(issuerA.kid(alg));
      });
    }

    it('aud as an array that contains the endpoint URL', async () => {
      await verifier.verify(bearer(await issuerA.sign({ aud: [OTHER_SERVICE, AUD] })), AUD);
    });

    it('the discovery URL as aud on discovery', async () => {
      await verifier.verify(bearer(await issuerA.sign({ aud: DISCOVERY })), DISCOVERY);
    });

    it('no tenant claim when the issuer serves exactly one tenant', async () => {
      const id = await verifier.verify(bearer(await issuerA.sign({ tenant: undefined })), AUD);
      expect(id.tenant.id).to.equal('tenant-a');
    });

    it('a tenant claim naming one of the tenants of a shared issuer', async () => {
      const id = await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-d' })), AUD);
      expect(id.tenant.id).to.equal('tenant-d');
    });

    // The replay cache is keyed by the verified tenant: one tenant's use of a jti is not a
    // replay of another tenant's token from the same EHR.
    it('the same jti once for each tenant of a shared issuer', async () => {
      const jti = 'shared-jti-1';
      const c = await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-c', jti })), AUD);
      const d = await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-d', jti })), AUD);
      expect([c.tenant.id, d.tenant.id]).to.deep.equal(['tenant-c', 'tenant-d']);
      expect(replay.size()).to.equal(2);
    });

    it('exp within the 60 s leeway, iat up to 60 s ahead, a lifetime of exactly 1 hour', async () => {
      const t = nowS();
      await verifier.verify(bearer(await issuerA.sign({ iat: t - 100, exp: t - 30 })), AUD);
      await verifier.verify(bearer(await issuerA.sign({ iat: t + 30, exp: t + 300 })), AUD);
      await verifier.verify(bearer(await issuerA.sign({ iat: t, exp: t + 3600 })), AUD);
    });

    it('a jku header that the issuer allowlisted (fetched from there)', async () => {
      const before = jkuServer.count('/a-keys');
      await verifier.verify(bearer(await issuerA.sign({}, { jku: jkuServer.url('/a-keys') })), AUD);
      expect(jkuServer.count('/a-keys')).to.equal(before + 1);
    });

    it('a jku header equal to the registered jwksUri (Inferno-style clients send it; nothing new is fetched)', async () => {
      const before = uriServer.count('/u-keys');
      await verifier.verify(
        bearer(await uriIssuer.sign({ tenant: 'tenant-u' }, { jku: uriServer.url('/u-keys') })),
        AUD,
      );
      expect(uriServer.count('/u-keys')).to.be.at.most(before + 1);
    });

    it('the Bearer scheme in any case (RFC 7235 §2.1: auth schemes are case-insensitive)', async () => {
      await verifier.verify(`bearer ${await issuerA.sign()}`, AUD);
      await verifier.verify(`BEARER ${await issuerA.sign()}`, AUD);
    });

    it("typ 'jwt' in any case (RFC 7515: typ compares case-insensitively)", async () => {
      await verifier.verify(bearer(await issuerA.sign({}, { typ: 'jwt' })), AUD);
      await verifier.verify(bearer(await issuerA.sign({}, { typ: 'Jwt' })), AUD);
    });

    it('keys from a jwksUri, cached across calls', async () => {
      const before = uriServer.count('/u-keys');
      await verifier.verify(bearer(await uriIssuer.sign({ tenant: 'tenant-u' })), AUD);
      await verifier.verify(bearer(await uriIssuer.sign({ tenant: 'tenant-u' })), AUD);
      expect(uriServer.count('/u-keys')).to.equal(before + 1);
    });
  });

  describe('refuses (token-attack table)', () => {
    type Make = () => Promise<string | undefined> | string | undefined;
    const table: Array<[string, Make, AuthFailureReason, string?]> = [
      ['a missing Authorization header', () => undefined, 'missing'],
      ['an empty Authorization header', () => '', 'missing'],
      ['the Basic scheme', () => 'Basic dXNlcjpwYXNz', 'malformed'],
      ['Bearer without a token', () => 'Bearer ', 'malformed'],
      ['extra header parts', async () => `Bearer ${await issuerA.sign()} extra`, 'malformed'],
      ['two spaces after Bearer', async () => `Bearer  ${await issuerA.sign()}`, 'malformed'],
      ['garbage', () => 'Bearer garbage', 'malformed'],
      ['three garbage segments', () => 'Bearer aaa.bbb.ccc', 'malformed'],
      ['a JWE-shaped token (5 parts)', () => 'Bearer a.b.c.d.e', 'malformed'],
      ['an oversized token', () => `Bearer ${'a'.repeat(20_000)}.b.c`, 'malformed'],
      ['alg none', () => bearer(issuerA.unsigned()), 'bad_alg'],
      [
        'HS256 signed with the public key (PEM)',
        () => bearer(issuerA.hs256WithPublicKey({}, 'pem')),
        'bad_alg',
      ],
      [
        'HS256 signed with the public key (JWK JSON)',
        () => bearer(issuerA.hs256WithPublicKey({}, 'jwk')),
        'bad_alg',
      ],
      [
        'typ other than JWT',
        async () => bearer(await issuerA.sign({}, { typ: 'at+jwt' })),
        'bad_typ',
      ],
      [
        'no typ',
        async () => bearer(await issuerA.sign({}, { header: { typ: undefined } })),
        'bad_typ',
      ],
      [
        'no kid',
        async () => bearer(await issuerA.sign({}, { header: { kid: undefined } })),
        'missing_kid',
      ],
      [
        'an unknown kid',
        async () => bearer(await issuerA.sign({}, { kid: 'not-registered' })),
        'unknown_kid',
      ],
      [
        'a crit header',
        async () => bearer(await issuerA.sign({}, { header: { crit: ['exp'], exp: 1 } })),
        'malformed',
      ],
      [
        'a wrong key with the registered kid',
        async () => bearer(await issuerA.signWithForeignKey()),
        'bad_signature',
      ],
      [
        'a payload swapped under a valid signature',
        async () => {
          const [h, , s] = (await issuerA.sign()).split('.');
          const [, p] = (await issuerA.sign({ aud: OTHER_SERVICE })).split('.');
          return `Bearer ${h}.${p}.${s}`;
        },
        'bad_signature',
      ],
      [
        'an unregistered iss',
        async () => bearer(await issuerA.sign({ iss: 'https://evil.example.org' })),
        'unknown_issuer',
      ],
      ['no iss', async () => bearer(await issuerA.sign({ iss: undefined })), 'missing_claim'],
      [
        "tenant A's issuer claiming tenant B",
        async () => bearer(await issuerA.sign({ tenant: 'tenant-b' })),
        'bad_tenant',
      ],
      [
        'an unknown tenant claim',
        async () => bearer(await issuerA.sign({ tenant: 'nobody' })),
        'bad_tenant',
      ],
      [
        'a non-string tenant claim',
        async () => bearer(await issuerA.sign({ tenant: ['tenant-a'] })),
        'bad_tenant',
      ],
      [
        'no tenant claim when the issuer serves two tenants',
        async () => bearer(await shared.sign()),
        'bad_tenant',
      ],
      ['a suspended tenant', async () => bearer(await suspendedIssuer.sign()), 'suspended'],
      [
        'aud of another service',
        async () => bearer(await issuerA.sign({ aud: OTHER_SERVICE })),
        'bad_aud',
      ],
      [
        'the discovery URL as aud on a service call',
        async () => bearer(await issuerA.sign({ aud: DISCOVERY })),
        'bad_aud',
      ],
      [
        'aud with a trailing slash',
        async () => bearer(await issuerA.sign({ aud: `${AUD}/` })),
        'bad_aud',
      ],
      [
        'aud with a different case',
        async () => bearer(await issuerA.sign({ aud: AUD.toUpperCase() })),
        'bad_aud',
      ],
      [
        'aud as an array without the endpoint',
        async () => bearer(await issuerA.sign({ aud: [OTHER_SERVICE, DISCOVERY] })),
        'bad_aud',
      ],
      ['aud as an empty array', async () => bearer(await issuerA.sign({ aud: [] })), 'bad_aud'],
      ['no aud', async () => bearer(await issuerA.sign({ aud: undefined })), 'missing_claim'],
      [
        'an expired token',
        async () => bearer(await issuerA.sign({ iat: nowS() - 400, exp: nowS() - 61 })),
        'expired',
      ],
      [
        'a future iat',
        async () => bearer(await issuerA.sign({ iat: nowS() + 120, exp: nowS() + 400 })),
        'future_iat',
      ],
      [
        'a future nbf',
        async () => bearer(await issuerA.sign({ nbf: nowS() + 120 })),
        'not_yet_valid',
      ],
      [
        'an over-long lifetime',
        async () => bearer(await issuerA.sign({ exp: nowS() + 3601 })),
        'lifetime',
      ],
      ['no exp', async () => bearer(await issuerA.sign({ exp: undefined })), 'missing_claim'],
      ['no iat', async () => bearer(await issuerA.sign({ iat: undefined })), 'missing_claim'],
      [
        'exp as a string',
        async () => bearer(await issuerA.sign({ exp: String(nowS() + 300) })),
        'malformed',
      ],
      ['no jti', async () => bearer(await issuerA.sign({ jti: undefined })), 'missing_claim'],
      ['a numeric jti', async () => bearer(await issuerA.sign({ jti: 42 })), 'malformed'],
      [
        'an unlisted jku',
        async () => bearer(await issuerA.sign({}, { jku: jkuServer.url('/evil-keys') })),
        'bad_jku',
      ],
      [
        "another issuer's jwksUri as jku",
        async () => bearer(await issuerA.sign({}, { jku: uriServer.url('/u-keys') })),
        'bad_jku',
      ],
      [
        'a jku from another issuer registration',
        async () => bearer(await issuerB.sign({}, { jku: jkuServer.url('/a-keys') })),
        'bad_jku',
      ],
      [
        'an unreachable jwksUri',
        async () =>
          bearer(await issuerA.sign({ iss: 'https://ehr-x.example.org', tenant: undefined })),
        'jwks_unavailable',
      ],
    ];

    for (const [name, make, reason, audience] of table) {
      it(`${name} -> ${reason}, with no replay-cache entry consumed`, async () => {
        const authorization = await make();
        const before = replay.size();
        const err = await refusal(verifier.verify(authorization, audience ?? AUD));
        expect(err.reason).to.equal(reason);
        expect(replay.size()).to.equal(before);
        expect(failures.map((f) => f.reason)).to.deep.equal([reason]);
        if (authorization) {
          const jwt = authorization.split(' ')[1] ?? authorization;
          if (jwt.length > 10) {
            expect(err.message).to.not.include(jwt);
            expect(JSON.stringify(failures)).to.not.include(jwt);
          }
        }
      });
    }

    it('makes no request to an unlisted jku', async () => {
      const jwt = await issuerA.sign({}, { jku: jkuServer.url('/evil-keys') });
      await refusal(verifier.verify(bearer(jwt), AUD));
      expect(jkuServer.count('/evil-keys')).to.equal(0);
    });

    it("a replayed jti within one tenant of a shared issuer, not the other tenant's", async () => {
      const jti = 'shared-jti-2';
      await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-c', jti })), AUD);
      const err = await refusal(
        verifier.verify(bearer(await shared.sign({ tenant: 'tenant-c', jti })), AUD),
      );
      expect(err.reason).to.equal('replayed');
      await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-d', jti })), AUD);
    });

    it('a replayed jti (the second use), leaving the cache as it was', async () => {
      const jwt = await issuerA.sign();
      await verifier.verify(bearer(jwt), AUD);
      expect(replay.size()).to.equal(1);
      const err = await refusal(verifier.verify(bearer(jwt), AUD));
      expect(err.reason).to.equal('replayed');
      expect(replay.size()).to.equal(1);
    });

    it('a replay after exp but inside the leeway (the jti is kept until exp + leeway)', async () => {
      const jwt = await issuerA.sign({ exp: nowS() + 10 });
      await verifier.verify(bearer(jwt), AUD);
      nowMs += 40_000; // exp + 30 s: still acceptable by time, so must still be remembered
      expect((await refusal(verifier.verify(bearer(jwt), AUD))).reason).to.equal('replayed');
      nowMs += 40_000; // past exp + leeway: the time check refuses it
      expect((await refusal(verifier.verify(bearer(jwt), AUD))).reason).to.equal('expired');
    });

    it('a replay of a token with a fractional exp, up to the last second it is accepted', async () => {
      // RFC 7519 allows a fractional NumericDate; the time check compares whole seconds, so the
      // token is accepted until ceil(exp + leeway) and its jti must be kept that long too.
      const jwt = await issuerA.sign({ exp: nowS() + 10.2 });
      await verifier.verify(bearer(jwt), AUD);
      nowMs += (10.2 + 60 + 0.5) * 1000; // past exp + leeway, before its next whole second
      for (let i = 0; i < 3; i++) {
        expect((await refusal(verifier.verify(bearer(jwt), AUD))).reason).to.equal('replayed');
      }
      nowMs += 1000;
      expect((await refusal(verifier.verify(bearer(jwt), AUD))).reason).to.equal('expired');
    });

    it("keeps the jti one leeway more (the cache's clock, e.g. Redis's, may be ahead of ours) and tells the cache the token's iat", async () => {
      const calls: unknown[][] = [];
      verifier = buildVerifier({
        replayCache: {
          remember: (...args: unknown[]) => {
            calls.push(args);
            return Promise.resolve(true);
          },
        },
      });
      const iat = nowS() - 5;
      await verifier.verify(bearer(await issuerA.sign({ iat, exp: nowS() + 10.2 })), AUD);
      expect(calls).to.deep.equal([
        ['tenant-a', issuerA.iss, calls[0]?.[2], Math.ceil(nowS() + 10.2 + 2 * 60), iat],
      ]);
    });

    it('refuses with replay_backend_reset / replay_clock_skew / replay_backend_unsupported (503) a token the cache may have lost track of, or cannot watch', async () => {
      for (const [err, reason, says] of [
        [
          new RedisHistoryLostError('restarted', new Date(nowMs)),
          'replay_backend_reset',
          'replay_backend_reset',
        ],
        [new RedisClockSkewError(90_000), 'replay_clock_skew', 'replay_clock_skew'],
        [new RedisUnsupportedError('TIME', 'renamed away'), 'replay_backend_unsupported', 'TIME'],
        [new RedisVersionError('6.2.14'), 'replay_backend_unsupported', '6.2.14'],
      ] as const) {
        verifier = buildVerifier({ replayCache: { remember: () => Promise.reject(err) } });
        const refused = await refusal(verifier.verify(bearer(await issuerA.sign()), AUD));
        expect(refused.reason).to.equal(reason);
        expect(refused.message).to.include(says);
        expect(RETRYABLE_AUTH_FAILURES.has(refused.reason)).to.equal(true);
      }
    });

    it('the same jti from the same issuer even for another audience', async () => {
      const jti = 'fixed-jti-1';
      await verifier.verify(bearer(await issuerA.sign({ jti, aud: [AUD, OTHER_SERVICE] })), AUD);
      const err = await refusal(
        verifier.verify(bearer(await issuerA.sign({ jti, aud: OTHER_SERVICE })), OTHER_SERVICE),
      );
      expect(err.reason).to.equal('replayed');
    });

    it('an algorithm outside a narrower configured allowlist', async () => {
      verifier = buildVerifier({ algorithms: ['ES384'] });
      const err = await refusal(
        verifier.verify(bearer(await issuerA.sign({}, { alg: 'RS256' })), AUD),
      );
      expect(err.reason).to.equal('bad_alg');
    });

    // A published key that says what it is for is used only for that: a JWK declaring another
    // `alg` than the header's, `use: enc` or other `key_ops` never verifies a signature. (Inline
    // sets are checked at registration; a jwksUri set arrives unchecked.)
    for (const [name, patch] of [
      ['declares another alg than the header', { alg: 'ES256' }],
      ['is published for encryption (use enc)', { use: 'enc' }],
      ['allows only other operations (key_ops)', { key_ops: ['encrypt'] }],
    ] as const) {
      it(`a signature by a key that ${name} -> bad_signature`, async () => {
        uriServer.setJwks({ keys: uriIssuer.publicJwks().keys.map((k) => ({ ...k, ...patch })) });
        const err = await refusal(
          verifier.verify(bearer(await uriIssuer.sign({ tenant: 'tenant-u' })), AUD),
        );
        expect(err.reason).to.equal('bad_signature');
        expect(replay.size()).to.equal(0);
      });
    }

    it('refuses to register an inline key published for encryption', async () => {
      const keys = issuerB.publicJwks().keys.map((k) => ({ ...k, use: 'enc' }));
      const err = await cp.tenants
        .update('tenant-b', { issuers: [{ iss: issuerB.iss, jwks: { keys } }] })
        .then(
          () => undefined,
          (e: unknown) => e,
        );
      expect(err).to.be.instanceOf(InvalidInputError);
      expect((err as InvalidInputError).field).to.equal('issuers[0].jwks.keys[0].use');
    });

    it('fails closed when the replay cache is full', async () => {
      replay = createMemoryReplayCache({ now: clock, maxEntries: 1 });
      verifier = buildVerifier();
      await verifier.verify(bearer(await issuerA.sign()), AUD);
      const err = await refusal(verifier.verify(bearer(await issuerA.sign()), AUD));
      expect(err.reason).to.equal('replay_unavailable');
    });

    // A share of 2 in a cache of 4: issuer A, at its share, may not take the last 2 places.
    it('refuses an issuer at its share of the replay cache (replay_quota), not the others', async () => {
      replay = createMemoryReplayCache({ now: clock, maxEntries: 4, maxPerIssuer: 2 });
      verifier = buildVerifier();
      await verifier.verify(bearer(await issuerA.sign()), AUD);
      await verifier.verify(bearer(await issuerA.sign()), AUD);
      const err = await refusal(verifier.verify(bearer(await issuerA.sign()), AUD));
      expect(err.reason).to.equal('replay_quota');
      expect(failures.at(-1)).to.deep.equal({
        reason: 'replay_quota',
        info: { iss: issuerA.iss, tenant: 'tenant-a' },
      });
      const ok = await verifier.verify(bearer(await issuerB.sign({ tenant: 'tenant-b' })), AUD);
      expect(ok.tenant.id).to.equal('tenant-b');
    });

    // The share is per (tenant, issuer): a tenant at its share does not use up the share of
    // another tenant whose EHR uses the same issuer.
    it("refuses a tenant at its share (replay_quota), not the shared issuer's other tenant", async () => {
      replay = createMemoryReplayCache({ now: clock, maxEntries: 4, maxPerIssuer: 2 });
      verifier = buildVerifier();
      for (let i = 0; i < 2; i++) {
        await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-c' })), AUD);
      }
      const err = await refusal(
        verifier.verify(bearer(await shared.sign({ tenant: 'tenant-c' })), AUD),
      );
      expect(err.reason).to.equal('replay_quota');
      expect(err.tenant).to.equal('tenant-c');
      const ok = await verifier.verify(bearer(await shared.sign({ tenant: 'tenant-d' })), AUD);
      expect(ok.tenant.id).to.equal('tenant-d');
    });

    it('reports the issuer and tenant (never the token) to onFailure', async () => {
      const jwt = await issuerA.sign({ aud: OTHER_SERVICE });
      await refusal(verifier.verify(bearer(jwt), AUD));
      expect(failures).to.deep.equal([
        { reason: 'bad_aud', info: { iss: issuerA.iss, tenant: 'tenant-a' } },
      ]);
    });
  });

  describe('configuration', () => {
    for (const algorithms of [['none'], ['HS256'], ['ES384', 'HS512'], []]) {
      it(`refuses to build a verifier allowing ${JSON.stringify(algorithms)}`, () => {
        expect(() => createTokenVerifier({ controlPlane: cp, algorithms })).to.throw(/asymmetric/);
      });
    }
  });

  describe('jwksUri rotation and the unknown-kid refetch', () => {
    /** The EHR of `tenant-<x>`, with a second key to rotate to. */
    async function issuerWithTwoKeys(x: string) {
      const issuer = await TestIssuer.create({
        iss: `https://ehr-${x}.example.org`,
        aud: AUD,
        tenant: `tenant-${x}`,
        now: clock,
      });
      return { issuer, oldKid: issuer.kid(), newKid: await issuer.addKey('ES384', `rotated-${x}`) };
    }

    // The signature is checked alongside the tenant lookup, against the registration the last
    // lookup returned (checkAhead). A change committed meanwhile by another process (the CLI)
    // must win: the next call is judged by the new registration only.
    it('judges the next call by a registration another process just changed (keys, status)', async () => {
      const { issuer, oldKid, newKid } = await issuerWithTwoKeys('r');
      await cp.tenants.create({
        id: 'tenant-r',
        name: 'tenant-r',
        region: 'eu-west',
        issuers: [{ iss: issuer.iss, jwks: issuer.publicJwksOf([oldKid]) }],
      });
      const byOld = () => issuer.sign({}, { signingKid: oldKid });
      const byNew = () => issuer.sign({}, { signingKid: newKid });
      expect((await verifier.verify(bearer(await byOld()), AUD)).tenant.id).to.equal('tenant-r');
      expect((await verifier.verify(bearer(await byOld()), AUD)).tenant.id).to.equal('tenant-r');
      const other = await openControlPlane({ storage: path.join(dir, 'control.sqlite') });
      try {
        await other.tenants.update('tenant-r', {
          issuers: [{ iss: issuer.iss, jwks: issuer.publicJwksOf([newKid]) }],
        });
        expect((await refusal(verifier.verify(bearer(await byOld()), AUD))).reason).to.equal(
          'unknown_kid',
        );
        expect((await verifier.verify(bearer(await byNew()), AUD)).tenant.id).to.equal('tenant-r');
        await other.tenants.update('tenant-r', { status: 'suspended' });
        expect((await refusal(verifier.verify(bearer(await byNew()), AUD))).reason).to.equal(
          'suspended',
        );
        await other.tenants.update('tenant-r', {
          status: 'active',
          issuers: [{ iss: issuer.iss, jwks: issuer.publicJwksOf([oldKid]) }],
        });
        const results = await Promise.allSettled(
          [byOld(), byNew(), byOld(), byNew()].map(async (t) =>
            verifier.verify(bearer(await t), AUD),
          ),
        );
        expect(results.map((r) => r.status)).to.deep.equal([
          'fulfilled',
          'rejected',
          'fulfilled',
          'rejected',
        ]);
      } finally {
        await other.close();
      }
    });

    // The check ahead runs on the registration the last lookup returned, which another process
    // may just have replaced (say, a key set URL the tenant no longer trusts): it must not make
    // a request on that registration's behalf.
    it('never fetches the key set URL of a registration another process just replaced', async () => {
      const { issuer, oldKid, newKid } = await issuerWithTwoKeys('m');
      const oldServer = await startJwksServer(issuer.publicJwksOf([oldKid]));
      const newServer = await startJwksServer(issuer.publicJwksOf([newKid]));
      try {
        await cp.tenants.create({
          id: 'tenant-m',
          name: 'tenant-m',
          region: 'eu-west',
          issuers: [{ iss: issuer.iss, jwksUri: oldServer.url('/keys') }],
        });
        for (let i = 0; i < 2; i++) {
          const ok = await verifier.verify(
            bearer(await issuer.sign({}, { signingKid: oldKid })),
            AUD,
          );
          expect(ok.tenant.id).to.equal('tenant-m');
        }
        expect(oldServer.count()).to.equal(1);
        const other = await openControlPlane({ storage: path.join(dir, 'control.sqlite') });
        try {
          await other.tenants.update('tenant-m', {
            issuers: [{ iss: issuer.iss, jwksUri: newServer.url('/keys') }],
          });
        } finally {
          await other.close();
        }
        // Past the refetch cooldown: an unknown kid at the old URL would have refetched it.
        nowMs += 31_000;
        const ok = await verifier.verify(
          bearer(await issuer.sign({}, { signingKid: newKid })),
          AUD,
        );
        expect(ok.tenant.id).to.equal('tenant-m');
        expect(oldServer.count()).to.equal(1);
        expect(newServer.count()).to.equal(1);
      } finally {
        await oldServer.close();
        await newServer.close();
      }
    });

    it('verifies a call whose key set expired from the cache since the last lookup (one fetch)', async () => {
      const base = uriServer.count('/u-keys');
      const signU = () => uriIssuer.sign({ tenant: 'tenant-u' });
      await verifier.verify(bearer(await signU()), AUD);
      await verifier.verify(bearer(await signU()), AUD);
      expect(uriServer.count('/u-keys') - base).to.equal(1);
      // The cached set is stale (300 s): the check ahead does not fetch, the confirmed one does.
      nowMs += 301_000;
      expect((await verifier.verify(bearer(await signU()), AUD)).tenant.id).to.equal('tenant-u');
      expect(uriServer.count('/u-keys') - base).to.equal(2);
    });

    it('refetches on an unknown kid at most once per cooldown, then picks up a rotated key', async () => {
      const base = uriServer.count('/u-keys');
      const fetches = (): number => uriServer.count('/u-keys') - base;
      const signU = (opts: SignOptions = {}) => uriIssuer.sign({ tenant: 'tenant-u' }, opts);
      await verifier.verify(bearer(await signU()), AUD);
      expect(fetches()).to.equal(1);

      // Unknown kids within the cooldown: no request at all (an attacker cannot make us fetch).
      for (let i = 0; i < 5; i++) {
        const err = await refusal(verifier.verify(bearer(await signU({ kid: `bogus-${i}` })), AUD));
        expect(err.reason).to.equal('unknown_kid');
      }
      expect(fetches()).to.equal(1);

      // After the cooldown, one refetch; the next unknown kid again waits.
      nowMs += 31_000;
      await refusal(verifier.verify(bearer(await signU({ kid: 'bogus-a' })), AUD));
      await refusal(verifier.verify(bearer(await signU({ kid: 'bogus-b' })), AUD));
      expect(fetches()).to.equal(2);

      // The EHR rotates: a new key appears at its JWKS URL and it signs with it. Within the
      // cooldown we still refuse; after it, one refetch finds the key.
      const newKid = await uriIssuer.addKey('ES384', 'rotated-1');
      uriServer.setJwks(uriIssuer.publicJwks());
      const signedByNew = await signU({ signingKid: newKid });
      expect((await refusal(verifier.verify(bearer(signedByNew), AUD))).reason).to.equal(
        'unknown_kid',
      );
      expect(fetches()).to.equal(2);
      nowMs += 31_000;
      await verifier.verify(bearer(signedByNew), AUD);
      expect(fetches()).to.equal(3);
      // A token naming the new kid but signed by the old key fails on its signature.
      const mislabelled = await signU({ kid: newKid });
      expect((await refusal(verifier.verify(bearer(mislabelled), AUD))).reason).to.equal(
        'bad_signature',
      );
    });
  });
});

describe('tenants/ createTokenVerifier: the CDS Hooks 2.0 spec example JWT', () => {
  const raw = fs
    .readFileSync(path.join(fixtures, 'example-authorization-header.txt'), 'utf8')
    .trim();
  const authorization = raw.replace(/^Authorization:\s*/, '');
  const jwksText = fs.readFileSync(path.join(fixtures, 'jwks-public.json'), 'utf8');
  const payload = JSON.parse(fs.readFileSync(path.join(fixtures, 'jwt-payload.json'), 'utf8')) as {
    iss: string;
    aud: string;
    iat: number;
    exp: number;
    tenant: string;
  };
  const jku = 'https://fhir-ehr.example.com/jwk_uri';
  let dir: string;
  let cp: ControlPlane;
  let fetched: string[];

  const offlineFetch = ((url: string | URL | Request) => {
    const u = typeof url === 'string' ? url : url instanceof URL ? url.href : url.url;
    fetched.push(u);
    return Promise.resolve(
      new Response(jwksText, { status: 200, headers: { 'content-type': 'application/json' } }),
    );
  }) as typeof fetch;

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
    cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite') });
    fetched = [];
    await cp.tenants.create({
      id: payload.tenant,
      name: 'Spec example tenant',
      region: 'us',
      issuers: [{ iss: payload.iss, jwksUri: jku, jku: [jku] }],
    });
  });

  afterEach(async () => {
    await cp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const verifierAt = (seconds: number, maxLifetimeSeconds?: number) =>
    createTokenVerifier({
      controlPlane: cp,
      jwks: createJwksFetcher({ fetchImpl: offlineFetch }),
      now: () => new Date(seconds * 1000),
      ...(maxLifetimeSeconds !== undefined ? { maxLifetimeSeconds } : {}),
    });

  it('verifies as a signature test vector (ES384, allowlisted jku, clock at its iat)', async () => {
    const id = await verifierAt(payload.iat, payload.exp - payload.iat).verify(
      authorization,
      payload.aud,
    );
    expect(id.tenant.id).to.equal(payload.tenant);
    expect(id.kid).to.equal('example-kid');
    expect(id.jti).to.equal('ee22b021-e1b7-4611-ba5b-8eec6a33ac1e');
    expect(fetched).to.deep.equal([jku]);
  });

  it('fails on one flipped signature byte', async () => {
    const [h, p, s] = authorization.slice('Bearer '.length).split('.') as [string, string, string];
    const sig = Buffer.from(s, 'base64url');
    sig[10] = (sig[10] ?? 0) ^ 0x01;
    const tampered = `Bearer ${h}.${p}.${sig.toString('base64url')}`;
    const err = await refusal(
      verifierAt(payload.iat, payload.exp - payload.iat).verify(tampered, payload.aud),
    );
    expect(err.reason).to.equal('bad_signature');
  });

  it('is refused under the default policy: its lifetime is years, and it expired in 2015', async () => {
    expect(
      (await refusal(verifierAt(payload.iat).verify(authorization, payload.aud))).reason,
    ).to.equal('lifetime');
    const today = Math.floor(Date.now() / 1000);
    expect((await refusal(verifierAt(today).verify(authorization, payload.aud))).reason).to.equal(
      'expired',
    );
  });

  it('is refused when its jku is not on the issuer allowlist, without fetching it', async () => {
    await cp.tenants.update(payload.tenant, {
      issuers: [
        {
          iss: payload.iss,
          jwks: JSON.parse(jwksText) as { keys: Array<Record<string, unknown>> },
        },
      ],
    });
    const err = await refusal(
      verifierAt(payload.iat, payload.exp - payload.iat).verify(authorization, payload.aud),
    );
    expect(err.reason).to.equal('bad_jku');
    expect(fetched).to.deep.equal([]);
  });
});
