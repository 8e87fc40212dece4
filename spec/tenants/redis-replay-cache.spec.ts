import { expect } from 'chai';
import { createRedisReplayCache } from '../../tenants/index.ts';
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
      await dead.close?.();
    }
  });
});
