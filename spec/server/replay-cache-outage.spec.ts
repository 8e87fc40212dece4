/**
 * Redis (the replay cache) stops answering under a running server, as on-call sees it: /readyz
 * and a CDS call's 503 agree (one state, whoever noticed first: the probe's PING or a token), the
 * change is logged once each way, calls refused while Redis is unreachable are answered at once
 * (not after the command timeout), they are counted as hook outcome `unavailable` (not `error`),
 * and tokens are accepted again as soon as Redis answers. Real HTTP, real signed tokens, the
 * machine's Redis behind a throwaway TCP proxy that stalls or refuses (Redis is never touched),
 * under this spec's own key prefix (removed after).
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import { Redis } from 'ioredis';
import request from 'supertest';
import { createApp } from '../../server/app.ts';
import { replayStateLogger } from '../../server/bootstrap.ts';
import { createRedisReplayCache, createTokenVerifier } from '../../tenants/index.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';
import { startTcpProxy } from '../tenants/data-plane/tcp-proxy.ts';
import type { TcpProxy } from '../tenants/data-plane/tcp-proxy.ts';

const REDIS_URL = process.env.CELLCDS_TEST_REDIS_URL;
const SERVICE = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

interface LogLine {
  level: string;
  msg: string;
  replayCache?: string;
  part?: string;
}

(REDIS_URL ? describe : describe.skip)(
  'replay cache outage: /readyz, 503s and metrics agree [redis]',
  function () {
    this.timeout(90_000);
    const prefix = `cellcds-spec-outage-http:${String(process.pid)}:${String(Date.now())}:`;
    let proxy: TcpProxy;
    let t: TestApp;
    let ehr: TestIssuer;
    let cache: ReturnType<typeof createRedisReplayCache>;
    let app: TestApp['app'];

    before(async () => {
      proxy = await startTcpProxy(REDIS_URL ?? '');
      t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
      expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
      ehr = await t.addTenant('replay-outage', {
        subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
      });
      // As server/bootstrap.ts wires a shared cache (its logger, its readiness part), under this
      // spec's own prefix and behind the proxy.
      cache = createRedisReplayCache({
        url: proxy.url,
        prefix,
        commandTimeoutMs: 1000,
        onStateChange: replayStateLogger(t.deps.log),
      });
      app = createApp({
        ...t.deps,
        verifier: createTokenVerifier({ controlPlane: t.deps.controlPlane, replayCache: cache }),
        replayCacheHealth: () => cache.health(),
      });
    });
    afterEach(() => {
      proxy.resume();
      proxy.maxConns = Number.POSITIVE_INFINITY;
    });
    after(async () => {
      await cache.close();
      await proxy.close();
      await t.close();
      const admin = new Redis(REDIS_URL ?? '');
      try {
        const keys = await admin.keys(`${prefix}*`);
        if (keys.length > 0) {
          await admin.del(...keys);
        }
      } finally {
        await admin.quit();
      }
    });

    const call = async () =>
      request(app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${await freshToken()}`)
        .send(warfarinNsaidRequest());
    const freshToken = () =>
      ehr.sign({ aud: SERVICE, tenant: 'replay-outage', jti: crypto.randomUUID() });
    const readyz = () => request(app).get('/readyz');
    const linesSince = (from: number): LogLine[] =>
      t.logLines.slice(from).map((l) => JSON.parse(l) as LogLine);
    const replayChanges = (from: number, state: string) =>
      linesSince(from).filter((l) => l.replayCache === state);
    /** `cellcds_hook_duration_seconds_count` of CDS calls with `outcome`, summed over services. */
    const hookCount = async (outcome: string): Promise<number> => {
      const text = (await request(app).get('/metrics')).text;
      return text
        .split('\n')
        .filter(
          (l) =>
            l.startsWith('cellcds_hook_duration_seconds_count{') &&
            l.includes('endpoint="call"') &&
            l.includes(`outcome="${outcome}"`),
        )
        .reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);
    };
    async function until(what: () => Promise<boolean>, ms: number): Promise<boolean> {
      const deadline = Date.now() + ms;
      while (Date.now() < deadline) {
        if (await what()) {
          return true;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      return false;
    }
    function expectReplayCacheDown(res: request.Response): void {
      expect(res.status, JSON.stringify(res.body)).to.equal(503);
      expect(res.body).to.include({ ready: false, replayCache: 'down' });
      expect(res.body.reasons.replayCache).to.deep.equal({
        code: 'unreachable',
        message: 'Redis does not answer',
      });
    }

    it('agrees between /readyz and the calls, logging each change once, whoever saw it first', async () => {
      expect((await call()).status).to.equal(200);
      expect((await readyz()).body).to.include({ ready: true, replayCache: 'ok' });

      // Redis stops answering (connection open, nothing comes back); no call meanwhile.
      const from = t.logLines.length;
      proxy.stall();
      expectReplayCacheDown(await readyz());
      // The probe alone moved the replay cache's state: on-call is warned before any token.
      expect(replayChanges(from, 'down')).to.have.length(1);
      expect(replayChanges(from, 'down')[0]).to.include({ level: 'warn' });
      const refused = await call();
      expect(refused.status).to.equal(503);
      expect(refused.body).to.include({ error: 'unavailable' });
      expectReplayCacheDown(await readyz());
      expect(replayChanges(from, 'down'), 'one warning for the whole outage').to.have.length(1);

      // Back: the probe sees it first and says so (once), and the next call is accepted.
      proxy.resume();
      expect(await until(async () => (await readyz()).status === 200, 10_000)).to.equal(true);
      expect(replayChanges(from, 'up')).to.have.length(1);
      expect(replayChanges(from, 'up')[0]).to.include({ level: 'info' });
      expect((await call()).status).to.equal(200);
      expect(replayChanges(from, 'up')).to.have.length(1);
      expect(replayChanges(from, 'down')).to.have.length(1);
      expect(linesSince(from).filter((l) => l.level === 'error')).to.deep.equal([]);
    });

    it('refuses at once while Redis is unreachable, counted as unavailable, and accepts again', async () => {
      expect((await call()).status).to.equal(200);
      const unavailableBefore = await hookCount('unavailable');
      const errorsBefore = await hookCount('error');
      const from = t.logLines.length;

      // Unreachable: every connection closed, new ones refused. The first call finds it out.
      proxy.maxConns = 0;
      proxy.dropAll();
      expect((await call()).status).to.equal(503);
      for (let i = 0; i < 4; i++) {
        const started = performance.now();
        const res = await call();
        const ms = performance.now() - started;
        expect(res.status).to.equal(503);
        expect(res.headers['retry-after']).to.equal('5');
        // The command timeout is 1000 ms: a refusal no longer waits for it.
        expect(ms, `call ${String(i)} took ${ms.toFixed(0)} ms`).to.be.below(300);
      }
      const started = performance.now();
      expectReplayCacheDown(await readyz());
      expect(performance.now() - started).to.be.below(300);
      expect(replayChanges(from, 'down')).to.have.length(1);

      // Counted apart from the server's own errors (alerts on `error` stay quiet).
      expect(await hookCount('unavailable')).to.equal(unavailableBefore + 5);
      expect(await hookCount('error')).to.equal(errorsBefore);

      // Reachable again: the client reconnects by itself, and calls are accepted, no restart.
      proxy.maxConns = Number.POSITIVE_INFINITY;
      expect(await until(async () => (await call()).status === 200, 15_000)).to.equal(true);
      expect((await readyz()).body).to.include({ ready: true, replayCache: 'ok' });
      expect(replayChanges(from, 'up')).to.have.length(1);
    });
  },
);
