import crypto from 'node:crypto';
import net from 'node:net';
import { expect } from 'chai';
import { Redis } from 'ioredis';
import {
  createRedisReplayCache,
  RedisClockSkewError,
  RedisHistoryLostError,
  RedisUnsupportedError,
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
    // (A 50 ms leeway: Redis's TIME and ours, read a few ms apart, must agree within it.)
    const { cache: long, events: none } = cache({
      maxTokenLifetimeSeconds: 0.5,
      leewaySeconds: 0.05,
    });
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

  it("refuses every token while Redis's clock is ahead of ours by more than the leeway, and serves again once they agree", async () => {
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

  it("serves tokens while Redis's clock is behind ours by more than the leeway (entries then outlive their tokens)", async () => {
    await waitPastStart();
    const offsetMs = 90_000; // this replica's clock 90 s ahead of Redis's, the leeway 1 s
    const { cache: c, events } = cache({ now: () => new Date(Date.now() + offsetMs) });
    const iat = Math.floor((Date.now() + offsetMs) / 1000);
    const jti = crypto.randomUUID();
    const tokenExp = iat + 60;
    expect(await c.remember('t', 'https://iss.example', jti, tokenExp, iat)).to.equal(true);
    expect(await c.remember('t', 'https://iss.example', jti, tokenExp, iat)).to.equal(false);
    expect(await c.health()).to.deep.equal({ ok: true });
    expect(events.filter((e) => e.kind !== 'reset')).to.deep.equal([]);
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
      // Big values first, then tiny ones: a refused 1 KB SET's own query buffer is what pushed
      // Redis over maxmemory, and once it is freed a small write fits again (a remember then
      // slipped through). Filled with tiny writes, Redis is over the limit by less than any
      // remember's own command.
      for (const size of [1000, 1]) {
        for (let i = 0; ; i++) {
          const filled = await settle(
            admin.set(`reset-spec:fill:${String(size)}:${String(i)}`, 'x'.repeat(size)),
          );
          if (filled instanceof Error) {
            expect(filled.message).to.match(/^OOM/);
            break;
          }
        }
      }
      // Filled. Redis's own buffers still come and go (a client's query buffer freed, a stats
      // update), which once left room for one remember after the fill: the limit now sits
      // 64 KB under what Redis uses, so it stays full whatever is freed meanwhile.
      await admin.config('SET', 'maxmemory', String((await used()) - 65_536));
      const before = await used();
      const keys = await admin.dbsize();
      for (let i = 0; i < 200; i++) {
        const refused = await settle(
          c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds()),
        );
        expect(refused).to.be.instanceOf(ReplayCacheFullError);
      }
      // Nothing written: not one key more (Redis's own buffers for 200 refused commands may
      // take some tens of KB, well under the 64 KB margin).
      expect(await admin.dbsize()).to.equal(keys);
      expect(await used()).to.be.lessThan(before + 65_536);
      expect(c.state()).to.equal('up');
    } finally {
      await admin.config('SET', 'maxmemory', '0');
      await admin.flushall();
    }
  });

  it('refuses every token, reported as unsupported (not unreachable), when Redis refuses TIME (renamed away)', async () => {
    const otherPort = await freePort();
    const other = await startRedis(otherPort, ['--rename-command', 'TIME', '']);
    try {
      const { cache: c, events } = cache({ url: `redis://127.0.0.1:${String(otherPort)}` });
      const refused = await settle(
        c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds()),
      );
      expect(refused).to.be.instanceOf(RedisUnsupportedError);
      expect(String(refused)).to.include('TIME');
      expect(c.state()).to.equal('up');
      const health = await c.health();
      expect(health).to.include({ ok: false, code: 'unsupported' });
      expect(JSON.stringify(health)).to.include('TIME');
      expect(
        await settle(
          c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds()),
        ),
      ).to.be.instanceOf(RedisUnsupportedError);
      expect(events.filter((e) => e.kind === 'unsupported')).to.have.length(1);
    } finally {
      await stopRedis(other);
    }
  });

  it('refuses every token, reported as unsupported, when INFO lacks run_id (a Redis-like server)', async () => {
    // Answers INFO without run_id, TIME and PING (RESP), as a Redis-compatible service might.
    const info = [
      'redis_version:7.2.0',
      'uptime_in_seconds:100000',
      'evicted_keys:0',
      'maxmemory_policy:noeviction',
      'loading:0',
      '',
    ].join('\r\n');
    const bulk = (text: string) => `$${String(Buffer.byteLength(text))}\r\n${text}\r\n`;
    const server = net.createServer((socket) => {
      let buffered = '';
      socket.on('error', () => undefined);
      socket.on('data', (data) => {
        buffered += data.toString('utf8');
        // Each command: *N then N bulk strings; the first names the command.
        for (;;) {
          const m = /^\*(\d+)\r\n/.exec(buffered);
          if (!m) {
            return;
          }
          const parts: string[] = [];
          let rest = buffered.slice(m[0].length);
          for (let i = 0; i < Number(m[1]); i++) {
            const b = /^\$(\d+)\r\n/.exec(rest);
            if (!b || rest.length < b[0].length + Number(b[1]) + 2) {
              return;
            }
            parts.push(rest.slice(b[0].length, b[0].length + Number(b[1])));
            rest = rest.slice(b[0].length + Number(b[1]) + 2);
          }
          buffered = rest;
          const command = (parts[0] ?? '').toUpperCase();
          if (command === 'INFO') {
            socket.write(bulk(info));
          } else if (command === 'TIME') {
            const ms = Date.now();
            socket.write(
              `*2\r\n${bulk(String(Math.floor(ms / 1000)))}${bulk(String((ms % 1000) * 1000))}`,
            );
          } else if (command === 'PING') {
            socket.write('+PONG\r\n');
          } else {
            socket.write(`-ERR unknown command '${command}'\r\n`);
          }
        }
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const { port: fakePort } = server.address() as net.AddressInfo;
      const { cache: c } = cache({ url: `redis://127.0.0.1:${String(fakePort)}` });
      const refused = await settle(
        c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds()),
      );
      expect(refused).to.be.instanceOf(RedisUnsupportedError);
      expect(String(refused)).to.include('INFO run_id');
      expect(await c.health()).to.include({ ok: false, code: 'unsupported' });
      await c.close();
    } finally {
      server.close();
    }
  });

  /** A Redis started on a free port and up for `uptime` seconds at least (older than the window). */
  async function oldRedis(
    uptime: number,
  ): Promise<{ child: ChildProcess; port: number; url: string }> {
    const otherPort = await freePort();
    const child = await startRedis(otherPort);
    const otherUrl = `redis://127.0.0.1:${String(otherPort)}`;
    const probe = new Redis(otherUrl);
    try {
      for (;;) {
        const up = Number(/uptime_in_seconds:(\d+)/.exec(await probe.info('server'))?.[1]);
        if (up >= uptime) {
          break;
        }
        await sleep(250);
      }
    } finally {
      probe.disconnect();
    }
    return { child, port: otherPort, url: otherUrl };
  }

  it('refuses a replay after FLUSHDB (seen at the next token, not 5 s later), and serves tokens issued after', async () => {
    await waitPastStart();
    const { cache: c, events } = cache();
    for (let i = 0; i < 2; i++) {
      await c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds());
    }
    const iat = nowSeconds();
    const jti = crypto.randomUUID();
    expect(await c.remember('t', 'https://iss.example', jti, exp(), iat)).to.equal(true);
    await admin.flushdb();
    // Issued after the flush + the 1 s leeway: the script finds another epoch, the cache reads
    // Redis again at once, and the token passes.
    expect(
      await c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds() + 2),
    ).to.equal(true);
    const replay = await settle(c.remember('t', 'https://iss.example', jti, exp(), iat));
    expect(replay).to.be.instanceOf(RedisHistoryLostError);
    expect(resets(events)).to.deep.equal(['flushed']);
  });

  it('refuses, on a process started after a failover, a replay of a token the old primary saw', async () => {
    const primary = await oldRedis(4);
    const promoted = await oldRedis(4);
    try {
      const prefix = `reset-spec:${crypto.randomUUID()}:`;
      // A 1 s lifetime + 2 x 1 s leeway: both Redis are older than that (no started_recently).
      const { cache: old } = cache({ url: primary.url, prefix, maxTokenLifetimeSeconds: 1 });
      const iat = nowSeconds();
      const jti = crypto.randomUUID();
      expect(await old.remember('t', 'https://iss.example', jti, exp(), iat)).to.equal(true);
      // The promoted replica has the epoch (replicated) but not the last write (the jti).
      const p = new Redis(primary.url);
      const r = new Redis(promoted.url);
      try {
        const replicated = await p.hgetall(`${prefix}epoch`);
        if (Object.keys(replicated).length > 0) {
          await r.hset(`${prefix}epoch`, replicated);
        }
      } finally {
        p.disconnect();
        r.disconnect();
      }
      const { cache: fresh, events } = cache({
        url: promoted.url,
        prefix,
        maxTokenLifetimeSeconds: 1,
      });
      const replay = await settle(fresh.remember('t', 'https://iss.example', jti, exp(), iat));
      expect(replay).to.be.instanceOf(RedisHistoryLostError);
      expect(resets(events)).to.deep.equal(['restarted']);
    } finally {
      await stopRedis(primary.child);
      await stopRedis(promoted.child);
    }
  });

  it('refuses a replay at once when Redis restarts behind a proxy that keeps the connection', async () => {
    await waitPastStart();
    const other = await oldRedis(0);
    // Keeps the client's socket; its upstream can be switched (a restarted Redis, no reconnect).
    let upstreamPort = port;
    const upstreams = new Set<net.Socket>();
    let clients = 0;
    const proxy = net.createServer((client) => {
      clients += 1;
      let up: net.Socket | undefined;
      const connect = () => {
        up = net.connect(upstreamPort, '127.0.0.1');
        upstreams.add(up);
        up.on('data', (d) => client.write(d));
        up.on('error', () => undefined);
      };
      connect();
      client.on('data', (d) => up?.write(d));
      client.on('error', () => undefined);
      client.on('close', () => up?.destroy());
      proxySwitch = () => {
        up?.destroy();
        connect();
      };
    });
    let proxySwitch = (): void => undefined;
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
    try {
      const { port: proxyPort } = proxy.address() as net.AddressInfo;
      const { cache: c, events } = cache({ url: `redis://127.0.0.1:${String(proxyPort)}` });
      // Past the read that the first connection's `ready` asks again: the next is 5 s away.
      for (let i = 0; i < 2; i++) {
        await c.remember('t', 'https://iss.example', crypto.randomUUID(), exp(), nowSeconds());
      }
      const iat = nowSeconds();
      const jti = crypto.randomUUID();
      expect(await c.remember('t', 'https://iss.example', jti, exp(), iat)).to.equal(true);
      upstreamPort = other.port;
      proxySwitch();
      const replay = await settle(c.remember('t', 'https://iss.example', jti, exp(), iat));
      expect(replay).to.be.instanceOf(RedisHistoryLostError);
      expect(resets(events)).to.deep.equal(['restarted']);
      expect(clients).to.equal(1); // the client never reconnected
      await c.close();
    } finally {
      for (const u of upstreams) {
        u.destroy();
      }
      proxy.close();
      await stopRedis(other.child);
    }
  });
});
