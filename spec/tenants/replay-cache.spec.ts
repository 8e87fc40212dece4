import { expect } from 'chai';
import fc from 'fast-check';
import { ReplayCacheFullError, createMemoryReplayCache } from '../../tenants/index.ts';

describe('tenants/ createMemoryReplayCache', () => {
  let nowMs: number;
  const now = (): Date => new Date(nowMs);
  const inSeconds = (s: number): number => Math.floor(nowMs / 1000) + s;

  beforeEach(() => {
    nowMs = Date.parse('2025-06-01T12:00:00Z');
  });

  it('accepts a jti once per issuer until its expiry', async () => {
    const cache = createMemoryReplayCache({ now });
    expect(await cache.remember('https://a', 'j1', inSeconds(60))).to.equal(true);
    expect(await cache.remember('https://a', 'j1', inSeconds(60))).to.equal(false);
    expect(await cache.remember('https://b', 'j1', inSeconds(60))).to.equal(true);
    nowMs += 61_000;
    expect(await cache.remember('https://a', 'j1', inSeconds(60))).to.equal(true);
  });

  it('does not confuse (iss, jti) pairs that concatenate alike', async () => {
    const cache = createMemoryReplayCache({ now });
    expect(await cache.remember('https://a|', 'b', inSeconds(60))).to.equal(true);
    expect(await cache.remember('https://a', '|b', inSeconds(60))).to.equal(true);
  });

  it('refuses new entries when full of unexpired ones, and never forgets them', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 3 });
    for (const j of ['1', '2', '3']) {
      expect(await cache.remember('iss', j, inSeconds(60))).to.equal(true);
    }
    let refused: unknown;
    try {
      await cache.remember('iss', '4', inSeconds(60));
    } catch (err) {
      refused = err;
    }
    expect(refused).to.be.instanceOf(ReplayCacheFullError);
    for (const j of ['1', '2', '3']) {
      expect(await cache.remember('iss', j, inSeconds(60))).to.equal(false);
    }
    expect(cache.size()).to.equal(3);
  });

  it('prunes expired entries to make room', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 2 });
    await cache.remember('iss', 'short', inSeconds(5));
    await cache.remember('iss', 'long', inSeconds(600));
    nowMs += 10_000;
    expect(await cache.remember('iss', 'new', inSeconds(60))).to.equal(true);
    expect(cache.size()).to.equal(2);
    expect(await cache.remember('iss', 'long', inSeconds(600))).to.equal(false);
  });

  it('answers true exactly for the first sighting of each unexpired pair (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.constantFrom('https://a', 'https://b'), fc.string({ maxLength: 4 })), {
          maxLength: 60,
        }),
        async (pairs) => {
          const cache = createMemoryReplayCache({ now });
          const seen = new Set<string>();
          for (const [iss, jti] of pairs) {
            const key = JSON.stringify([iss, jti]);
            expect(await cache.remember(iss, jti, inSeconds(300))).to.equal(!seen.has(key));
            seen.add(key);
          }
        },
      ),
    );
  });
});
