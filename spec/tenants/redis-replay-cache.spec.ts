import { expect } from 'chai';
import { Redis } from 'ioredis';
import {
  createRedisReplayCache,
  RedisEvictsKeysError,
  ReplayCacheFullError,
  ReplayIssuerQuotaError,
} from '../../tenants/index.ts';
import type { ReplayCache } from '../../tenants/index.ts';

const url = process.env.CELLCDS_TEST_REDIS_URL;

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
    a = createRedisReplayCache({ url, prefix });
    b = createRedisReplayCache({ url, prefix });
  });
  after(async () => {
    await a.close?.();
    await b.close?.();
  });
  const exp = () => Math.floor(Date.now() / 1000) + 300;

  it('accepts a jti once, across replicas', async () => {
    expect(await a.remember('https://iss.example', 'jti-1', exp())).to.equal(true);
    expect(await b.remember('https://iss.example', 'jti-1', exp())).to.equal(false);
    expect(await a.remember('https://iss.example', 'jti-1', exp())).to.equal(false);
  });

  it('keeps issuers apart', async () => {
    expect(await a.remember('https://one.example', 'same', exp())).to.equal(true);
    expect(await a.remember('https://two.example', 'same', exp())).to.equal(true);
  });

  it('forgets a pair after its expiry', async () => {
    const soon = Math.floor(Date.now() / 1000) + 1;
    expect(await a.remember('https://iss.example', 'short', soon)).to.equal(true);
    await new Promise((r) => setTimeout(r, 2100));
    expect(await b.remember('https://iss.example', 'short', exp())).to.equal(true);
  });

  // One tenant's EHR must not fill the shared cache and lock out the others: a busy issuer may
  // not take the last share of places, counted across replicas, given back as tokens expire.
  it('keeps the last share for issuers under theirs, on every replica', async () => {
    const own = `${prefix}share:`;
    const x = createRedisReplayCache({ url, prefix: own, maxEntries: 6, maxPerIssuer: 2 });
    const y = createRedisReplayCache({ url, prefix: own, maxEntries: 6, maxPerIssuer: 2 });
    try {
      const greedy = 'https://greedy.example';
      const soon = Math.floor(Date.now() / 1000) + 2;
      expect(await x.remember(greedy, 'g1', soon)).to.equal(true);
      expect(await y.remember(greedy, 'g2', exp())).to.equal(true);
      expect(await x.remember(greedy, 'g3', exp())).to.equal(true);
      expect(await y.remember(greedy, 'g4', exp())).to.equal(true);
      const refused = await x.remember(greedy, 'g5', exp()).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(refused).to.be.instanceOf(ReplayIssuerQuotaError);
      // Its tokens stay replays; the last two places are the others'.
      expect(await x.remember(greedy, 'g2', exp())).to.equal(false);
      expect(await y.remember('https://other.example', 'o1', exp())).to.equal(true);
      expect(await x.remember('https://third.example', 'o1', exp())).to.equal(true);
      // Full: everyone is refused.
      expect(
        await y.remember('https://fourth.example', 'o1', exp()).catch((e: unknown) => e),
      ).to.be.instanceOf(ReplayCacheFullError);
      // g1 expires: its place is given back (to an issuer under its share).
      await new Promise((r) => setTimeout(r, 3100));
      expect(await y.remember('https://fourth.example', 'o1', exp())).to.equal(true);
      expect(await x.remember(greedy, 'g6', exp()).catch((e: unknown) => e)).to.be.instanceOf(
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
      expect(await a.remember(iss, 'late', far)).to.equal(true);
      expect(await a.remember(iss, 'early', far - 500)).to.equal(true);
      const keys = [...(await admin.keys(`${prefix}iss:*`)), `${prefix}all`];
      const ttls = await Promise.all(keys.map((k) => admin.pttl(k)));
      // Every count key (each issuer's, the whole cache's) expires, the longest with its latest
      // token (~600 s).
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
        await dead.remember('https://iss.example', 'x', exp());
      } catch {
        threw = true;
      }
      expect(threw).to.equal(true);
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
        const cache = createRedisReplayCache({ url, prefix });
        try {
          const err = await cache.ready().then(
            () => undefined,
            (e: unknown) => e,
          );
          expect(err).to.be.instanceOf(RedisEvictsKeysError);
          expect(String(err)).to.include(policy).and.to.include('noeviction');
          const refused = await cache.remember('https://iss.example', `ev-${policy}`, exp()).then(
            () => undefined,
            (e: unknown) => e,
          );
          expect(refused).to.be.instanceOf(RedisEvictsKeysError);
        } finally {
          await cache.close();
        }
        // Nothing was stored meanwhile: once Redis keeps its keys, the same jti is new.
        await admin.config('SET', 'maxmemory-policy', 'noeviction');
        const fixed = createRedisReplayCache({ url, prefix });
        try {
          expect(await fixed.remember('https://iss.example', `ev-${policy}`, exp())).to.equal(true);
        } finally {
          await fixed.close();
        }
      });
    }

    it('accepts tokens once the policy is noeviction (read before the first token)', async () => {
      await admin.config('SET', 'maxmemory-policy', 'noeviction');
      const cache = createRedisReplayCache({ url, prefix });
      try {
        await cache.ready();
        expect(await cache.remember('https://iss.example', 'after-fix', exp())).to.equal(true);
      } finally {
        await cache.close();
      }
    });
  });
});
