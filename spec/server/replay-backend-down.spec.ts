import crypto from 'node:crypto';
import { expect } from 'chai';
import { Redis } from 'ioredis';
import request from 'supertest';
import { createApp } from '../../server/app.ts';
import { replayStateLogger } from '../../server/bootstrap.ts';
import { createRedisReplayCache, createTokenVerifier } from '../../tenants/index.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { freePort } from '../helpers/processes.ts';
import {
  hasRedisServer,
  startRedis,
  stopRedis,
  type ChildProcess,
} from '../helpers/redis-server.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const SERVICE = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

interface LogLine {
  level: string;
  msg: string;
  reason?: string;
  replayCache?: string;
}

/**
 * A Redis replay cache that stops answering, or starts evicting, must not make the EHR believe
 * its token is bad: valid tokens get 503 with Retry-After (CDS Hooks clients retry on 5xx), still
 * refused (fail closed), audited and counted with their own reason, and on-call gets one warn
 * line per change (info when Redis is back). A replay is still a 401. Real HTTP, real signed
 * tokens, a private redis-server stopped and restarted under the running server.
 */
describe('replay cache backend down or evicting (HTTP, private redis-server)', function () {
  this.timeout(120_000);
  if (!hasRedisServer()) {
    it('needs redis-server on the PATH');
    return;
  }
  let port: number;
  let redis: ChildProcess | undefined;
  let t: TestApp;
  let ehr: TestIssuer;

  before(async () => {
    port = await freePort();
    redis = await startRedis(port);
    t = await buildTestApp({ CELLCDS_REDIS_URL: `redis://127.0.0.1:${String(port)}` });
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    ehr = await t.addTenant('replay-backend', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
  });
  after(async () => {
    await t.close();
    await stopRedis(redis);
  });

  const call = (app: TestApp['app'], token: string) =>
    request(app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
  // Issued at the leeway's edge (60 s ahead, as an EHR's clock may be): this spec's Redis is new,
  // and restarted, and tokens issued before it started (or was seen restarted) + the leeway are
  // refused for a token's lifetime (their jtis may be lost), as `lostToken` below.
  const freshToken = () =>
    ehr.sign({
      aud: SERVICE,
      tenant: 'replay-backend',
      jti: crypto.randomUUID(),
      iat: Math.floor(Date.now() / 1000) + 60,
      exp: Math.floor(Date.now() / 1000) + 300,
    });
  const lines = (): LogLine[] => t.logLines.map((l) => JSON.parse(l) as LogLine);
  const lastAuditReason = async (): Promise<unknown> => {
    await t.deps.failureAudit.flush();
    const events = await t.deps.controlPlane.audit.list({ type: 'auth.failure' });
    return events.at(-1)?.detail?.reason;
  };
  const failuresCounted = async (reason: string): Promise<number> => {
    const text = await t.deps.metrics.render();
    const line = text
      .split('\n')
      .find(
        (l) => l.startsWith('cellcds_auth_failures_total{') && l.includes(`reason="${reason}"`),
      );
    return line ? Number(line.split(' ').at(-1)) : 0;
  };

  function expectRetryable(res: request.Response): void {
    expect(res.status).to.equal(503);
    expect(res.headers['retry-after']).to.equal('5');
    expect(res.headers['www-authenticate']).to.equal(undefined);
    const requestId = res.headers['x-request-id'];
    expect(requestId).to.be.a('string');
    expect(res.body).to.deep.equal({
      error: 'unavailable',
      message: 'service unavailable, retry later',
      requestId,
    });
  }

  it('answers 503 + Retry-After while Redis is down, 401 for a replay, warns once, recovers', async () => {
    const first = await freshToken();
    expect((await call(t.app, first)).status).to.equal(200);
    const replay = await call(t.app, first);
    expect(replay.status).to.equal(401);
    expect(replay.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
    expect(await lastAuditReason()).to.equal('replayed');

    await stopRedis(redis);
    const before = t.logLines.length;
    for (let i = 0; i < 3; i++) {
      expectRetryable(await call(t.app, await freshToken()));
    }
    expect(await lastAuditReason()).to.equal('replay_backend_down');
    expect(await failuresCounted('replay_backend_down')).to.equal(3);
    const during = lines().slice(before);
    const warns = during.filter((l) => l.level === 'warn');
    expect(warns).to.have.length(1);
    expect(warns[0]).to.include({ replayCache: 'down' });
    expect(warns[0]?.msg).to.match(/does not answer/);
    // Each refused call keeps its own info line.
    expect(
      during.filter((l) => l.msg === 'request refused' && l.reason === 'replay_backend_down'),
    ).to.have.length(3);
    expect(during.filter((l) => l.level === 'error')).to.deep.equal([]);

    // Redis answers again: tokens are accepted (the client reconnects by itself), info once.
    redis = await startRedis(port);
    let status = 0;
    for (let i = 0; i < 40 && status !== 200; i++) {
      status = (await call(t.app, await freshToken())).status;
      if (status !== 200) {
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    expect(status).to.equal(200);
    const back = lines()
      .slice(before)
      .filter((l) => l.replayCache === 'up');
    expect(back).to.have.length(1);
    expect(back[0]).to.include({ level: 'info' });

    // The restarted Redis forgot `first`'s jti: a replay of it is not accepted, but refused as
    // an outage (503: it may be valid), audited replay_backend_reset; the reset warned once.
    for (let i = 0; i < 2; i++) {
      expectRetryable(await call(t.app, first));
    }
    expect(await lastAuditReason()).to.equal('replay_backend_reset');
    const resets = lines()
      .slice(before)
      .filter((l) => l.replayCache === 'reset');
    expect(resets).to.have.length(1);
    expect(resets[0]).to.include({ level: 'warn' });
  });

  it('answers 503 while Redis may evict keys, warns once, and accepts again once it may not', async () => {
    const url = `redis://127.0.0.1:${String(port)}`;
    // The server's cache re-reads the policy every minute: this one every 100 ms, same code.
    const cache = createRedisReplayCache({
      url,
      prefix: `cellcds-spec:${String(process.pid)}:${String(Date.now())}:`,
      policyCheckMs: 100,
      onStateChange: replayStateLogger(t.deps.log),
    });
    const app = createApp({
      ...t.deps,
      verifier: createTokenVerifier({ controlPlane: t.deps.controlPlane, replayCache: cache }),
    });
    const admin = new Redis(url);
    try {
      expect((await call(app, await freshToken())).status).to.equal(200);
      expect(cache.state()).to.equal('up');
      await admin.config('SET', 'maxmemory-policy', 'allkeys-lru');
      await new Promise((r) => setTimeout(r, 150));
      const before = t.logLines.length;
      for (let i = 0; i < 3; i++) {
        expectRetryable(await call(app, await freshToken()));
      }
      expect(cache.state()).to.equal('evicting');
      expect(await lastAuditReason()).to.equal('replay_policy_evicts');
      expect(await failuresCounted('replay_policy_evicts')).to.equal(3);
      const warns = lines()
        .slice(before)
        .filter((l) => l.level === 'warn');
      expect(warns).to.have.length(1);
      expect(warns[0]).to.include({ replayCache: 'evicting' });
      expect(warns[0]?.msg).to.match(/may evict keys/);

      await admin.config('SET', 'maxmemory-policy', 'noeviction');
      await new Promise((r) => setTimeout(r, 150));
      expect((await call(app, await freshToken())).status).to.equal(200);
      expect(cache.state()).to.equal('up');
      expect(
        lines()
          .slice(before)
          .filter((l) => l.replayCache === 'up' && l.level === 'info'),
      ).to.have.length(1);
    } finally {
      await admin.quit();
      await cache.close();
    }
  });

  it('answers a full cache 503 with Retry-After, audited replay_unavailable (it says nothing about the token)', async () => {
    const cache = createRedisReplayCache({
      url: `redis://127.0.0.1:${String(port)}`,
      prefix: `cellcds-spec-full:${String(process.pid)}:${String(Date.now())}:`,
      maxEntries: 1,
      maxPerIssuer: 1,
    });
    const app = createApp({
      ...t.deps,
      verifier: createTokenVerifier({ controlPlane: t.deps.controlPlane, replayCache: cache }),
    });
    try {
      expect((await call(app, await freshToken())).status).to.equal(200);
      // Its one place taken: the next token is refused, 503 (retry later, with a new token).
      expectRetryable(await call(app, await freshToken()));
      expect(await lastAuditReason()).to.equal('replay_unavailable');
    } finally {
      await cache.close();
    }
  });

  it('stops the boot, naming the command, when Redis refuses TIME (renamed away)', async () => {
    const otherPort = await freePort();
    const other = await startRedis(otherPort, ['--rename-command', 'TIME', '']);
    try {
      const failed = await buildTestApp({
        CELLCDS_REDIS_URL: `redis://127.0.0.1:${String(otherPort)}`,
      }).then(
        async (app) => {
          await app.close();
          return undefined;
        },
        (e: unknown) => e,
      );
      expect(failed).to.be.instanceOf(Error);
      expect(String(failed)).to.include('CELLCDS_REDIS_URL').and.to.include('TIME');
      expect(String(failed)).not.to.include('does not answer');
    } finally {
      await stopRedis(other);
    }
  });
});
