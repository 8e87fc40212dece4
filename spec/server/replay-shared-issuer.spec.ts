import crypto from 'node:crypto';
import { expect } from 'chai';
import { Redis } from 'ioredis';
import request from 'supertest';
import { createApp } from '../../server/app.ts';
import { createRedisReplayCache, createTokenVerifier } from '../../tenants/index.ts';
import type { ReplayCache } from '../../tenants/index.ts';
import { oldPairKey, rememberAsOldReplica } from '../helpers/old-replay-replica.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const redisUrl = process.env.CELLCDS_TEST_REDIS_URL;
const SERVICE = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
const DISCOVERY = `${PUBLIC_URL}/cds-services`;
/** The Redis key prefix the server uses (createRedisReplayCache's default). */
const SERVER_PREFIX = 'cellcds:jti:';

type Express = TestApp['app'];

/**
 * Tenants whose EHRs use the same issuer (the registry allows it: the `tenant` claim picks the
 * tenant) have their own jti space and their own share of the replay cache: one tenant's EHR
 * cannot get another's tokens refused as replays, nor use up the other's share. Over real HTTP,
 * with real signed tokens, for the in-process cache and for Redis (scale-out).
 */
describe('replay cache: tenants sharing an issuer (HTTP)', () => {
  const backends: Array<[string, Record<string, string> | undefined]> = [
    // Small enough for a spec to reach the share: 500 of 1,000 places.
    [
      'in-process',
      { CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '1000', CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER: '500' },
    ],
    ['Redis', redisUrl ? { CELLCDS_REDIS_URL: redisUrl } : undefined],
  ];
  for (const [backend, env] of backends) {
    describe(`${backend} cache`, () => {
      if (!env) {
        it('needs CELLCDS_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379)');
        return;
      }
      let t: TestApp;
      /** The app whose cache is sized 1,000 with a share of 500 (see quotaApp). */
      let small: Express;
      let smallCache: ReplayCache | undefined;
      let run = 0;

      before(async () => {
        t = await buildTestApp(env);
        expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
        small = t.app;
        if (redisUrl && backend === 'Redis') {
          // The server's Redis cache counts every entry under its prefix, other specs' and
          // processes' too: the quota spec gets a cache of its own (same code, own prefix), so
          // that nobody else's entries count against its 1,000 places.
          smallCache = createRedisReplayCache({
            url: redisUrl,
            prefix: `cellcds-spec:${process.pid}:${Date.now()}:`,
            maxEntries: 1000,
            maxPerIssuer: 500,
          });
          const verifier = createTokenVerifier({
            controlPlane: t.deps.controlPlane,
            replayCache: smallCache,
          });
          small = createApp({ ...t.deps, verifier });
        }
      });
      after(async () => {
        await smallCache?.close?.();
        await t.close();
      });

      /** One EHR (issuer) registered by two fresh tenants `<tag>-a` and `<tag>-b`. */
      async function twoTenantsOneIssuer(tag: string): Promise<TestIssuer> {
        run += 1;
        const ehr = await TestIssuer.create({
          iss: `https://shared-ehr-${String(process.pid)}-${String(Date.now())}-${String(run)}.example`,
        });
        const subscriptions = [{ pack: 'tiny', version: '1.0.0' }];
        await t.addTenant(`${tag}-a`, { subscriptions, issuer: ehr });
        // The second tenant on the issuer makes it shared: the operator confirms it.
        const second = await request(t.app)
          .post('/admin/tenants')
          .set('authorization', `Bearer ${t.adminToken}`)
          .send({
            id: `${tag}-b`,
            name: `Tenant ${tag}-b`,
            region: t.deps.config.region,
            issuers: [{ iss: ehr.iss, jwks: ehr.publicJwks() }],
            sharedIssuer: true,
          });
        expect(second.status, JSON.stringify(second.body)).to.equal(201);
        const sub = await request(t.app)
          .put(`/admin/tenants/${tag}-b/subscriptions`)
          .set('authorization', `Bearer ${t.adminToken}`)
          .send(subscriptions);
        expect(sub.status, JSON.stringify(sub.body)).to.equal(200);
        return ehr;
      }

      const callService = (app: Express, token: string) =>
        request(app)
          .post('/cds-services/tiny-order-sign')
          .set('authorization', `Bearer ${token}`)
          .send(warfarinNsaidRequest());

      /** The reason of the last refused token's audit event, and the tenant it names. */
      async function lastRefusal(): Promise<{ reason: unknown; tenant: string | undefined }> {
        const events = await t.deps.controlPlane.audit.list({ type: 'auth.failure' });
        const last = events.at(-1);
        return { reason: last?.detail?.reason, tenant: last?.tenant };
      }

      it('accepts the same jti once for each tenant, and refuses its replay within one', async () => {
        const ehr = await twoTenantsOneIssuer('jti');
        const jti = `shared-${crypto.randomUUID()}`;
        const forA = await ehr.sign({ aud: SERVICE, tenant: 'jti-a', jti });
        const forB = await ehr.sign({ aud: SERVICE, tenant: 'jti-b', jti });
        expect((await callService(t.app, forA)).status).to.equal(200);
        // Same issuer, same jti, another tenant: not a replay.
        expect((await callService(t.app, forB)).status).to.equal(200);
        for (const token of [forA, forB]) {
          const replay = await callService(t.app, token);
          expect(replay.status).to.equal(401);
          expect(replay.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
          expect((await lastRefusal()).reason).to.equal('replayed');
        }
        // A new token of A's reusing the jti is a replay too (the jti, not the token, is kept).
        const again = await callService(
          t.app,
          await ehr.sign({ aud: SERVICE, tenant: 'jti-a', jti }),
        );
        expect(again.status).to.equal(401);
        expect((await lastRefusal()).reason).to.equal('replayed');
      });

      it("refuses A's EHR beyond A's share, and never B's, though both use one issuer", async () => {
        const ehr = await twoTenantsOneIssuer('quota');
        const exp = Math.floor(Date.now() / 1000) + 600;
        // A's EHR sends 500 tokens (discovery calls, cheap): half the cache, A's share.
        const discovery = async () =>
          (
            await request(small)
              .get('/cds-services')
              .set(
                'authorization',
                `Bearer ${await ehr.sign({ aud: DISCOVERY, tenant: 'quota-a', exp })}`,
              )
          ).status;
        for (let i = 0; i < 500; i += 50) {
          const statuses = await Promise.all(Array.from({ length: 50 }, discovery));
          expect(statuses.every((status) => status === 200)).to.equal(true);
        }
        const refused = await callService(
          small,
          await ehr.sign({ aud: SERVICE, tenant: 'quota-a', exp }),
        );
        expect(refused.status).to.equal(401);
        expect(await lastRefusal()).to.deep.equal({ reason: 'replay_quota', tenant: 'quota-a' });
        for (let i = 0; i < 3; i++) {
          const ok = await callService(
            small,
            await ehr.sign({ aud: SERVICE, tenant: 'quota-b', exp }),
          );
          expect(ok.status).to.equal(200);
        }
      });

      if (backend !== 'Redis' || !redisUrl) {
        return;
      }
      const url = redisUrl;

      // Rolling upgrade: replicas of the version before still record `(iss, jti)` under the old
      // key shape. A jti they accepted is a replay here, and one accepted here is a replay there.
      describe('during a rolling upgrade (replicas of the previous version alongside)', () => {
        let admin: Redis;
        before(() => {
          admin = new Redis(url);
        });
        after(async () => {
          await admin.quit();
        });

        it('refuses a jti an old replica recorded (old key shape), for every tenant of the issuer', async () => {
          const ehr = await twoTenantsOneIssuer('upg');
          const jti = `old-${crypto.randomUUID()}`;
          const token = await ehr.sign({ aud: SERVICE, tenant: 'upg-a', jti });
          const exp = Math.floor(Date.now() / 1000) + 360;
          // The old replica took the token first.
          expect(await rememberAsOldReplica(admin, SERVER_PREFIX, ehr.iss, jti, exp)).to.equal(1);
          expect(await admin.get(oldPairKey(SERVER_PREFIX, ehr.iss, jti))).to.equal('1');
          const replay = await callService(t.app, token);
          expect(replay.status).to.equal(401);
          expect((await lastRefusal()).reason).to.equal('replayed');
          // The old key names no tenant: while it lives, the jti is spent for the whole issuer.
          const other = await callService(
            t.app,
            await ehr.sign({ aud: SERVICE, tenant: 'upg-b', jti }),
          );
          expect(other.status).to.equal(401);
          // Control: a jti no replica saw is accepted.
          expect(
            (await callService(t.app, await ehr.sign({ aud: SERVICE, tenant: 'upg-a' }))).status,
          ).to.equal(200);
        });

        it('leaves a mark old replicas read as "seen" for a jti it accepted', async () => {
          const ehr = await twoTenantsOneIssuer('mark');
          const jti = `new-${crypto.randomUUID()}`;
          const exp = Math.floor(Date.now() / 1000) + 360;
          const token = await ehr.sign({ aud: SERVICE, tenant: 'mark-a', jti });
          expect((await callService(t.app, token)).status).to.equal(200);
          // Replayed on an old replica: refused there too.
          expect(await rememberAsOldReplica(admin, SERVER_PREFIX, ehr.iss, jti, exp)).to.equal(0);
          // The mark does not spend the jti for the issuer's other tenants on this version.
          const forB = await ehr.sign({ aud: SERVICE, tenant: 'mark-b', jti });
          expect((await callService(t.app, forB)).status).to.equal(200);
        });
      });
    });
  }
});
