import crypto from 'node:crypto';
import { expect } from 'chai';
import { Redis } from 'ioredis';
import {
  createRedisReplayCache,
  RedisClockSkewError,
  RedisHistoryLostError,
  ReplayCacheFullError,
} from '../../tenants/index.ts';
import type { ReplayTrustEvent } from '../../tenants/index.ts';
import { freePort } from '../helpers/processes.ts';
import {
  hasRedisServer,
  startRedis,
  stopRedis,
  type ChildProcess,
} from '../helpers/redis-server.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** What a call settled with: its value, or the error it threw. */
const settle = (p: Promise<unknown>): Promise<unknown> =>
  p.then(
    (v) => v,
    (e: unknown) => e,
  );

/**
 * Redis forgetting jtis behind the cache's back (a restart or failover, evicted keys), its clock
 * apart from ours, its memory full: the cache must not accept a token that may be a replay. A
 * private redis-server per spec (killed and restarted, reconfigured), never the shared one.
 */
describe('Redis replay cache: restarts, evictions, clock skew, OOM (private redis-server)', function () {
  this.timeout(60_000);
  if (!hasRedisServer()) {
    it('needs redis-server on the PATH');
    return;
  }
  let port: number;
  let redis: ChildProcess | undefined;
  let url: string;
  let admin: Redis;
  const caches: { close(): Promise<void> }[] = [];
  const nowSeconds = () => Math.floor(Date.now() / 1000);
  const exp = () => nowSeconds() + 60;

  before(async () => {
    port = await freePort();
    url = `redis://127.0.0.1:${String(port)}`;
    redis = await startRedis(port);
    admin = new Redis(url);
    admin.on('error', () => undefined);
  });
  after(async () => {
    for (const cache of caches) {
      await cache.close();
    }
    admin.disconnect();
    await stopRedis(redis);
  });

  /** A cache with a 1 s leeway and 60 s tokens, so Redis's start matters for seconds only. */
  function cache(opts: Partial<Parameters<typeof createRedisReplayCache>[0]> = {}) {
    const events: ReplayTrustEvent[] = [];
    const created = createRedisReplayCache({
      url,
      prefix: `reset-spec:${crypto.randomUUID()}:`,
      leewaySeconds: 1,
      maxTokenLifetimeSeconds: 60,
      onTrustEvent: (e) => events.push(e),
      ...opts,
    });
    caches.push(created);
    return { cache: created, events };
  }

  /** The resets a cache reported, but Redis's recent start on first sight (every spec's Redis is new). */
  const resets = (events: ReplayTrustEvent[]) =>
    events.flatMap((e) => (e.kind === 'reset' && e.cause !== 'started_recently' ? [e.cause] : []));

  /** Past Redis's start + the 1 s leeway (its uptime is read in whole seconds). */
  async function waitPastStart(): Promise<void> {
    const uptime = Number(/uptime_in_seconds:(\d+)/.exec(await admin.info('server'))?.[1]);
    if (uptime < 3) {
      await sleep((3 - uptime) * 1000 + 100);
    }
  }

  it('refuses, after Redis restarted, a token issued before (its jti may be lost), and logs it once', async () => {
    await waitPastStart();
    const { cache: c, events } = cache();
    const iat = nowSeconds();
    const jti = crypto.randomUUID();
    const tokenExp = exp();
    expect(await c.remember('t', 'https://iss.example', jti, tokenExp, iat)).to.equal(true);
    expect(resets(events)).to.deep.equal([]);

    await stopRedis(redis);
    redis = await startRedis(port);
    let replay: unknown;
    for (let i = 0; i < 50; i++) {
      replay = await settle(c.remember('t', 'https://iss.example', jti, tokenExp, iat));
      if (!(replay instanceof Error) || replay instanceof RedisHistoryLostError) {
        break;
      }
      await sleep(200); // not reconnected yet (`down`)
    }
    expect(replay).to.be.instanceOf(RedisHistoryLostError);
    expect(String(replay)).to.include('replay_backend_reset');
    // Again: still refused, logged once.
    expect(
      await settle(c.remember('t', 'https://iss.example', jti, tokenExp, iat)),
    ).to.be.instanceOf(RedisHistoryLostError);
    expect(resets(events)).to.deep.equal(['restarted']);
    expect(c.state()).to.equal('up');
    expect(await c.health()).to.deep.equal({ ok: true });
    // A token issued after the restart (+ the leeway) is served.
    expect(
      await c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds() + 2),
    ).to.equal(true);
  });

  it('refuses, on first sight of a Redis started less than a token lifetime ago, the tokens issued before it started', async () => {
    await stopRedis(redis);
    redis = await startRedis(port);
    const { cache: c, events } = cache();
    const refused = await settle(
      c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds() - 30),
    );
    expect(refused).to.be.instanceOf(RedisHistoryLostError);
    expect(events.map((e) => e.kind === 'reset' && e.cause)).to.deep.equal(['started_recently']);
    // A Redis up longer than a token's lifetime + 2 leeways: nothing of it matters any more.
    await waitPastStart();
    const { cache: long, events: none } = cache({ maxTokenLifetimeSeconds: 0.5, leewaySeconds: 0 });
    expect(
      await long.remember(
        't',
        'https://iss.example',
        crypto.randomUUID(),
        exp(),
        nowSeconds() - 30,
      ),
    ).to.equal(true);
    expect(none).to.deep.equal([]);
  });

  it('reads Redis every 5 s: keys evicted under a policy set at runtime get the tokens issued before refused', async () => {
    await waitPastStart();
    const { cache: c, events } = cache();
    const iat = nowSeconds();
    const jti = crypto.randomUUID();
    const tokenExp = exp();
    expect(await c.remember('t', 'https://iss.example', jti, tokenExp, iat)).to.equal(true);
    // An operator sets an evicting policy, Redis evicts (everything), the policy is set back.
    try {
      await admin.config('SET', 'maxmemory-policy', 'allkeys-random');
      await admin.config('SET', 'maxmemory', '1');
      await admin.set('reset-spec:junk', 'x'.repeat(1000)).catch(() => undefined);
    } finally {
      await admin.config('SET', 'maxmemory', '0');
      await admin.config('SET', 'maxmemory-policy', 'noeviction');
    }
    expect(Number(/evicted_keys:(\d+)/.exec(await admin.info('stats'))?.[1])).to.be.greaterThan(0);
    await sleep(5_300);
    const replay = await settle(c.remember('t', 'https://iss.example', jti, tokenExp, iat));
    expect(replay).to.be.instanceOf(RedisHistoryLostError);
    expect(resets(events)).to.deep.equal(['evicted']);
    expect(
      await c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds() + 2),
    ).to.equal(true);
  });

  it("refuses every token while Redis's clock and ours differ by more than the leeway, and serves again once they agree", async () => {
    await waitPastStart();
    let offsetMs = -90_000; // this replica's clock 90 s behind Redis's
    const { cache: c, events } = cache({
      leewaySeconds: 60,
      policyCheckMs: 100,
      now: () => new Date(Date.now() + offsetMs),
    });
    const iat = () => Math.floor((Date.now() + offsetMs) / 1000);
    const refused = await settle(
      c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), iat()),
    );
    expect(refused).to.be.instanceOf(RedisClockSkewError);
    expect(String(refused)).to.include('replay_clock_skew');
    expect(await c.health()).to.include({ ok: false, code: 'clock_skew' });
    offsetMs = 0;
    await sleep(200);
    expect(
      await c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), iat()),
    ).to.equal(true);
    expect(events.filter((e) => e.kind !== 'reset').map((e) => e.kind)).to.deep.equal([
      'clock_skew',
      'clock_ok',
    ]);
  });

  it("refuses the token (full: 503) once Redis's memory is full under noeviction, writing nothing", async () => {
    await waitPastStart();
    const { cache: c } = cache();
    await c.ready();
    const used = async () => Number(/used_memory:(\d+)/.exec(await admin.info('memory'))?.[1]);
    const max = (await used()) + 200_000;
    try {
      await admin.config('SET', 'maxmemory-policy', 'noeviction');
      await admin.config('SET', 'maxmemory', String(max));
      for (let i = 0; ; i++) {
        const filled = await settle(admin.set(`reset-spec:fill:${String(i)}`, 'x'.repeat(1000)));
        if (filled instanceof Error) {
          expect(filled.message).to.match(/^OOM/);
          break;
        }
      }
      const before = await used();
      for (let i = 0; i < 200; i++) {
        const refused = await settle(
          c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds()),
        );
        expect(refused).to.be.instanceOf(ReplayCacheFullError);
      }
      expect(await used()).to.be.lessThan(before + 20_000);
      expect(c.state()).to.equal('up');
    } finally {
      await admin.config('SET', 'maxmemory', '0');
      await admin.flushall();
    }
  });
});
