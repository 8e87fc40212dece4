import crypto from 'node:crypto';
import { expect } from 'chai';
import { Redis } from 'ioredis';
import {
  createRedisReplayCache,
  RedisEvictsKeysError,
  ReplayBackendError,
  ReplayCacheFullError,
  ReplayIssuerQuotaError,
} from '../../tenants/index.ts';
import type { ReplayBackendState, ReplayCache } from '../../tenants/index.ts';
import { oldPairKey, rememberAsOldReplica } from '../helpers/old-replay-replica.ts';
import { startTcpProxy } from './data-plane/tcp-proxy.ts';
import type { TcpProxy } from './data-plane/tcp-proxy.ts';

const url = process.env.CELLCDS_TEST_REDIS_URL;

/**
 * These specs call `remember` without a token's `iat`: on a Redis started less than a token's
 * lifetime + 2 leeways ago (it may have lost jtis) that is refused, so the caches here assume
 * 1-s tokens and a 1-s leeway (redis-replay-reset.spec.ts covers a young Redis).
 */
const anyRedis = { maxTokenLifetimeSeconds: 1, leewaySeconds: 1 };

/** The scale-out replay cache against the real Redis on this machine (.ci/run sets the URL). */
describe('Redis replay cache (scale-out)', function () {
  if (!url) {
    it('needs CELLCDS_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379)');
    return;
  }
  const prefix = `cellcds-spec:${process.pid}:${Date.now()}:`;
  let a: ReplayCache;
  let b: ReplayCache;
  before(() => {
    a = createRedisReplayCache({ ...anyRedis, url, prefix });
    b = createRedisReplayCache({ ...anyRedis, url, prefix });
  });
  after(async () => {
    await a.close?.();
    await b.close?.();
  });
  const exp = () => Math.floor(Date.now() / 1000) + 300;

  it('accepts a jti once, across replicas', async () => {
    expect(await a.remember('t', 'https://iss.example', 'jti-1', exp())).to.equal(true);
    expect(await b.remember('t', 'https://iss.example', 'jti-1', exp())).to.equal(false);
    expect(await a.remember('t', 'https://iss.example', 'jti-1', exp())).to.equal(false);
  });

  it('keeps issuers apart', async () => {
    expect(await a.remember('t', 'https://one.example', 'same', exp())).to.equal(true);
    expect(await a.remember('t', 'https://two.example', 'same', exp())).to.equal(true);
  });

  // Tenants whose EHRs use the same issuer: a jti used for one is not a replay for the other.
  it('keeps tenants of one issuer apart, across replicas', async () => {
    const iss = 'https://shared.example';
    expect(await a.remember('tenant-a', iss, 'same', exp())).to.equal(true);
    expect(await b.remember('tenant-b', iss, 'same', exp())).to.equal(true);
    expect(await b.remember('tenant-a', iss, 'same', exp())).to.equal(false);
    expect(await a.remember('tenant-b', iss, 'same', exp())).to.equal(false);
  });

  it('does not confuse (tenant, iss, jti) triples that concatenate alike', async () => {
    expect(await a.remember('t|https://x.example', 'j', 'k', exp())).to.equal(true);
    expect(await a.remember('t', 'https://x.example|j', 'k', exp())).to.equal(true);
  });

  // One tenant's EHR at its share must not get another tenant on the same issuer refused.
  it('gives each tenant of an issuer its own share, on every replica', async () => {
    const own = `${prefix}tenant-share:`;
    const x = createRedisReplayCache({
      ...anyRedis,
      url,
      prefix: own,
      maxEntries: 6,
      maxPerIssuer: 2,
    });
    const y = createRedisReplayCache({
      ...anyRedis,
      url,
      prefix: own,
      maxEntries: 6,
      maxPerIssuer: 2,
    });
    try {
      const iss = 'https://shared.example';
      for (const [cache, jti] of [
        [x, 'g1'],
        [y, 'g2'],
        [x, 'g3'],
        [y, 'g4'],
      ] as const) {
        expect(await cache.remember('busy', iss, jti, exp())).to.equal(true);
      }
      expect(await x.remember('busy', iss, 'g5', exp()).catch((e: unknown) => e)).to.be.instanceOf(
        ReplayIssuerQuotaError,
      );
      expect(await y.remember('quiet', iss, 'q1', exp())).to.equal(true);
      expect(await x.remember('quiet', iss, 'q2', exp())).to.equal(true);
    } finally {
      await x.close();
      await y.close();
    }
  });

  // Rolling upgrade: replicas of the previous version record (iss, jti) under the old key
  // shape, and check only that key.
  describe('beside replicas of the previous version (old key shape)', () => {
    let admin: Redis;
    before(() => {
      admin = new Redis(url);
    });
    after(async () => {
      await admin.quit();
    });

    it('refuses a jti an old replica recorded, for every tenant of the issuer', async () => {
      const iss = 'https://upgrade.example';
      expect(await rememberAsOldReplica(admin, prefix, iss, 'old-1', exp())).to.equal(1);
      expect(await a.remember('tenant-a', iss, 'old-1', exp())).to.equal(false);
      expect(await b.remember('tenant-b', iss, 'old-1', exp())).to.equal(false);
      expect(await a.remember('tenant-a', iss, 'new-1', exp())).to.equal(true);
    });

    it('marks the old key of a jti it accepted, which old replicas read as seen', async () => {
      const iss = 'https://upgrade.example';
      expect(await a.remember('tenant-a', iss, 'new-2', exp())).to.equal(true);
      expect(await admin.get(oldPairKey(prefix, iss, 'new-2'))).to.equal('v2');
      expect(await rememberAsOldReplica(admin, prefix, iss, 'new-2', exp())).to.equal(0);
      // The mark is not a use of the jti for the issuer's other tenants on this version.
      expect(await b.remember('tenant-b', iss, 'new-2', exp())).to.equal(true);
    });

    it('keeps the mark until the latest expiry of the tenants that used the jti', async () => {
      const iss = 'https://upgrade.example';
      const far = Math.floor(Date.now() / 1000) + 900;
      expect(await a.remember('tenant-a', iss, 'new-3', far - 600)).to.equal(true);
      expect(await b.remember('tenant-b', iss, 'new-3', far)).to.equal(true);
      expect(await a.remember('tenant-c', iss, 'new-3', far - 700)).to.equal(true);
      expect(await admin.pttl(oldPairKey(prefix, iss, 'new-3'))).to.be.within(890_000, 900_000);
    });

    // The shapes docs/operations.md documents: a tagged triple, never the old pair's shape.
    it('keeps its entries under `v2:` keys of a tagged triple, apart from the old keys', async () => {
      const iss = 'https://shape.example';
      const sha256 = (text: string) => crypto.createHash('sha256').update(text).digest('hex');
      expect(await a.remember('tenant-a', iss, 'j', exp())).to.equal(true);
      const entry = `${prefix}v2:${sha256(JSON.stringify(['v2', 'tenant-a', iss, 'j']))}`;
      expect(await admin.get(entry)).to.equal('1');
      expect(await admin.pttl(entry)).to.be.within(290_000, 300_000);
      const share = `${prefix}v2:share:${sha256(JSON.stringify(['v2', 'tenant-a', iss]))}`;
      expect(await admin.zcard(share)).to.equal(1);
      // The old pair's key holds only the mark, never an entry.
      expect(await admin.get(oldPairKey(prefix, iss, 'j'))).to.equal('v2');
    });
  });

  it('forgets a pair after its expiry', async () => {
    const soon = Math.floor(Date.now() / 1000) + 1;
    expect(await a.remember('t', 'https://iss.example', 'short', soon)).to.equal(true);
    await new Promise((r) => setTimeout(r, 2100));
    expect(await b.remember('t', 'https://iss.example', 'short', exp())).to.equal(true);
  });

  // One tenant's EHR must not fill the shared cache and lock out the others: a busy issuer may
  // not take the last share of places, counted across replicas, given back as tokens expire.
  it('keeps the last share for issuers under theirs, on every replica', async () => {
    const own = `${prefix}share:`;
    const x = createRedisReplayCache({
      ...anyRedis,
      url,
      prefix: own,
      maxEntries: 6,
      maxPerIssuer: 2,
    });
    const y = createRedisReplayCache({
      ...anyRedis,
      url,
      prefix: own,
      maxEntries: 6,
      maxPerIssuer: 2,
    });
    try {
      const greedy = 'https://greedy.example';
      const soon = Math.floor(Date.now() / 1000) + 2;
      expect(await x.remember('t', greedy, 'g1', soon)).to.equal(true);
      expect(await y.remember('t', greedy, 'g2', exp())).to.equal(true);
      expect(await x.remember('t', greedy, 'g3', exp())).to.equal(true);
      expect(await y.remember('t', greedy, 'g4', exp())).to.equal(true);
      const refused = await x.remember('t', greedy, 'g5', exp()).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(refused).to.be.instanceOf(ReplayIssuerQuotaError);
      // Its tokens stay replays; the last two places are the others'.
      expect(await x.remember('t', greedy, 'g2', exp())).to.equal(false);
      expect(await y.remember('t', 'https://other.example', 'o1', exp())).to.equal(true);
      expect(await x.remember('t', 'https://third.example', 'o1', exp())).to.equal(true);
      // Full: everyone is refused.
      expect(
        await y.remember('t', 'https://fourth.example', 'o1', exp()).catch((e: unknown) => e),
      ).to.be.instanceOf(ReplayCacheFullError);
      // g1 expires: its place is given back (to an issuer under its share).
      await new Promise((r) => setTimeout(r, 3100));
      expect(await y.remember('t', 'https://fourth.example', 'o1', exp())).to.equal(true);
      expect(await x.remember('t', greedy, 'g6', exp()).catch((e: unknown) => e)).to.be.instanceOf(
        ReplayCacheFullError,
      );
    } finally {
      await x.close();
      await y.close();
    }
  });

  it("keeps the issuer's count no longer than its last token", async () => {
    const admin = new Redis(url);
    try {
      const iss = 'https://ttl.example';
      const far = Math.floor(Date.now() / 1000) + 600;
      expect(await a.remember('t', iss, 'late', far)).to.equal(true);
      expect(await a.remember('t', iss, 'early', far - 500)).to.equal(true);
      const keys = [...(await admin.keys(`${prefix}v2:share:*`)), `${prefix}all`];
      const ttls = await Promise.all(keys.map((k) => admin.pttl(k)));
      // Every count key (each (tenant, issuer)'s, the whole cache's) expires, the longest with
      // its latest token (~600 s).
      expect(ttls.every((t) => t > 0)).to.equal(true);
      expect(Math.max(...ttls)).to.be.within(590_000, 600_000);
    } finally {
      await admin.quit();
    }
  });

  it('fails closed when Redis cannot answer', async () => {
    const dead = createRedisReplayCache({
      url: 'redis://127.0.0.1:1',
      prefix,
      commandTimeoutMs: 300,
    });
    try {
      let threw = false;
      try {
        await dead.remember('t', 'https://iss.example', 'x', exp());
      } catch (err) {
        threw = true;
        // Typed for the verifier: a backend that does not answer (503), not a full cache.
        expect(err).to.be.instanceOf(ReplayBackendError);
        expect((err as ReplayBackendError).state).to.equal('down');
      }
      expect(threw).to.equal(true);
      expect(dead.state()).to.equal('down');
    } finally {
      await dead.close();
    }
  });

  // A Redis that evicts keys could forget a jti before its token expires. The machine's Redis
  // is switched to evicting policies for a moment (and back): every token is refused then.
  describe('a Redis that may evict keys', () => {
    let admin: Redis;
    let original: string;
    before(async () => {
      admin = new Redis(url);
      const reply = await admin.config('GET', 'maxmemory-policy');
      original = reply[1] ?? 'noeviction';
    });
    afterEach(async () => {
      await admin.config('SET', 'maxmemory-policy', original);
    });
    after(async () => {
      await admin.quit();
    });

    for (const policy of ['allkeys-lru', 'volatile-ttl']) {
      it(`refuses every token while maxmemory-policy is ${policy}, and says why`, async () => {
        await admin.config('SET', 'maxmemory-policy', policy);
        const cache = createRedisReplayCache({ ...anyRedis, url, prefix });
        try {
          const err = await cache.ready().then(
            () => undefined,
            (e: unknown) => e,
          );
          expect(err).to.be.instanceOf(RedisEvictsKeysError);
          expect(String(err)).to.include(policy).and.to.include('noeviction');
          const refused = await cache
            .remember('t', 'https://iss.example', `ev-${policy}`, exp())
            .then(
              () => undefined,
              (e: unknown) => e,
            );
          expect(refused).to.be.instanceOf(RedisEvictsKeysError);
          expect(cache.state()).to.equal('evicting');
        } finally {
          await cache.close();
        }
        // Nothing was stored meanwhile: once Redis keeps its keys, the same jti is new.
        await admin.config('SET', 'maxmemory-policy', 'noeviction');
        const fixed = createRedisReplayCache({ ...anyRedis, url, prefix });
        try {
          expect(await fixed.remember('t', 'https://iss.example', `ev-${policy}`, exp())).to.equal(
            true,
          );
        } finally {
          await fixed.close();
        }
      });
    }

    it('accepts tokens again soon after the policy is fixed, without a restart', async () => {
      await admin.config('SET', 'maxmemory-policy', 'allkeys-lru');
      // The default minute for a good policy: only the evicting verdict is read again sooner.
      const cache = createRedisReplayCache({ ...anyRedis, url, prefix, evictingRecheckMs: 200 });
      try {
        const refused = await cache.ready().then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(refused).to.be.instanceOf(RedisEvictsKeysError);
        await admin.config('SET', 'maxmemory-policy', 'noeviction');
        await new Promise((resolve) => setTimeout(resolve, 400));
        expect(await cache.remember('t', 'https://iss.example', 'fixed-soon', exp())).to.equal(
          true,
        );
        expect(cache.state()).to.equal('up');
      } finally {
        await cache.close();
      }
    });

    it('accepts tokens once the policy is noeviction (read before the first token)', async () => {
      await admin.config('SET', 'maxmemory-policy', 'noeviction');
      const cache = createRedisReplayCache({ ...anyRedis, url, prefix });
      try {
        await cache.ready();
        expect(await cache.remember('t', 'https://iss.example', 'after-fix', exp())).to.equal(true);
      } finally {
        await cache.close();
      }
    });
  });
});

/**
 * One state for tokens and readiness, and no second-long wait per token while Redis is down.
 * The machine's Redis behind a throwaway TCP proxy (spec/tenants/data-plane/tcp-proxy.ts) that
 * stops forwarding (a silent network), or closes every connection and refuses new ones (Redis
 * unreachable); Redis itself is never touched.
 */
describe('Redis replay cache while Redis does not answer (real Redis behind a TCP proxy)', function () {
  if (!url) {
    it('needs CELLCDS_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379)');
    return;
  }
  this.timeout(60_000);
  const prefix = `cellcds-spec-outage:${process.pid}:${Date.now()}:`;
  const exp = () => Math.floor(Date.now() / 1000) + 300;
  let proxy: TcpProxy;
  let cache: ReturnType<typeof createRedisReplayCache>;
  let changes: Array<[ReplayBackendState, ReplayBackendState | undefined]>;
  let n = 0;
  const remember = () => cache.remember('t', 'https://iss.example', `jti-${String(++n)}`, exp());
  const refusal = (p: Promise<unknown>) =>
    p.then(
      () => undefined,
      (e: unknown) => e,
    );

  beforeEach(async () => {
    proxy = await startTcpProxy(url);
    changes = [];
    cache = createRedisReplayCache({
      ...anyRedis,
      url: proxy.url,
      prefix,
      commandTimeoutMs: 1000,
      onStateChange: (state, previous) => changes.push([state, previous]),
    });
  });
  afterEach(async () => {
    proxy.resume();
    proxy.maxConns = Number.POSITIVE_INFINITY;
    await cache.close();
    await proxy.close();
  });
  after(async () => {
    const admin = new Redis(url);
    try {
      const keys = await admin.keys(`${prefix}*`);
      if (keys.length > 0) {
        await admin.del(...keys);
      }
    } finally {
      await admin.quit();
    }
  });

  it('moves state() with the readiness PING, and answers health() as state() says', async () => {
    expect(await cache.health()).to.deep.equal({ ok: true });
    expect(cache.state()).to.equal('up');
    // The network stops answering (connection still open): no token is involved.
    proxy.stall();
    expect(await cache.health()).to.deep.equal({
      ok: false,
      code: 'unreachable',
      message: 'Redis does not answer',
    });
    expect(cache.state()).to.equal('down');
    const refused = await refusal(remember());
    expect(refused).to.be.instanceOf(ReplayBackendError);
    expect((refused as ReplayBackendError).state).to.equal('down');
    expect(await cache.health()).to.include({ ok: false, code: 'unreachable' });
    // Back: the PING alone brings the state back up, before any token.
    proxy.resume();
    expect(await cache.health()).to.deep.equal({ ok: true });
    expect(cache.state()).to.equal('up');
    expect(await remember()).to.equal(true);
    // One change each way, whoever (PING or token) saw it first.
    expect(changes).to.deep.equal([
      ['up', undefined],
      ['down', 'up'],
      ['up', 'down'],
    ]);
  });

  it('refuses at once while Redis is down and unreachable, and accepts again once it reconnects', async () => {
    expect(await remember()).to.equal(true);
    // Unreachable: every connection closed, new ones refused.
    proxy.maxConns = 0;
    proxy.dropAll();
    const first = await refusal(remember());
    expect(first).to.be.instanceOf(ReplayBackendError);
    expect(cache.state()).to.equal('down');
    // Later tokens do not wait for the command timeout (1000 ms) each.
    for (let i = 0; i < 5; i++) {
      const started = performance.now();
      const err = await refusal(remember());
      const ms = performance.now() - started;
      expect(err).to.be.instanceOf(ReplayBackendError);
      expect((err as ReplayBackendError).state).to.equal('down');
      expect(ms, `refusal ${String(i)} took ${ms.toFixed(0)} ms`).to.be.below(300);
    }
    // Nor does the readiness probe, and it agrees.
    const started = performance.now();
    expect(await cache.health()).to.include({ ok: false, code: 'unreachable' });
    expect(performance.now() - started).to.be.below(300);
    expect(changes.filter(([s]) => s === 'down')).to.have.length(1);
    // Reachable again: ioredis reconnects by itself (its retry strategy, up to ~5 s apart) and
    // tokens are accepted, no restart.
    proxy.maxConns = Number.POSITIVE_INFINITY;
    const deadline = Date.now() + 15_000;
    let accepted = false;
    while (!accepted && Date.now() < deadline) {
      accepted = await remember().catch(() => false);
      if (!accepted) {
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    expect(accepted).to.equal(true);
    expect(cache.state()).to.equal('up');
    expect(changes).to.deep.equal([
      ['up', undefined],
      ['down', 'up'],
      ['up', 'down'],
    ]);
  });

  it('waits for the connection on the first command (no refusal while it is being opened)', async () => {
    // A fresh client: its connection is still being opened when the first token comes.
    expect(await remember()).to.equal(true);
    expect(changes).to.deep.equal([['up', undefined]]);
  });
});
