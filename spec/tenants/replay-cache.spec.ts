import { expect } from 'chai';
import fc from 'fast-check';
import {
  ReplayCacheFullError,
  ReplayIssuerQuotaError,
  createMemoryReplayCache,
} from '../../tenants/index.ts';

describe('tenants/ createMemoryReplayCache', () => {
  let nowMs: number;
  const now = (): Date => new Date(nowMs);
  const inSeconds = (s: number): number => Math.floor(nowMs / 1000) + s;

  beforeEach(() => {
    nowMs = Date.parse('2025-06-01T12:00:00Z');
  });

  it('accepts a jti once per issuer until its expiry', async () => {
    const cache = createMemoryReplayCache({ now });
    expect(await cache.remember('t', 'https://a', 'j1', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'https://a', 'j1', inSeconds(60))).to.equal(false);
    expect(await cache.remember('t', 'https://b', 'j1', inSeconds(60))).to.equal(true);
    nowMs += 61_000;
    expect(await cache.remember('t', 'https://a', 'j1', inSeconds(60))).to.equal(true);
  });

  it('does not confuse (iss, jti) pairs that concatenate alike', async () => {
    const cache = createMemoryReplayCache({ now });
    expect(await cache.remember('t', 'https://a|', 'b', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'https://a', '|b', inSeconds(60))).to.equal(true);
  });

  // Tenants whose EHRs use the same issuer: a jti used for one is not a replay for the other.
  it('accepts a jti once per tenant of an issuer, and keeps each tenant its own', async () => {
    const cache = createMemoryReplayCache({ now });
    expect(await cache.remember('tenant-a', 'https://ehr', 'j1', inSeconds(60))).to.equal(true);
    expect(await cache.remember('tenant-b', 'https://ehr', 'j1', inSeconds(60))).to.equal(true);
    expect(await cache.remember('tenant-a', 'https://ehr', 'j1', inSeconds(60))).to.equal(false);
    expect(await cache.remember('tenant-b', 'https://ehr', 'j1', inSeconds(60))).to.equal(false);
    expect(cache.size()).to.equal(2);
  });

  it('does not confuse (tenant, iss, jti) triples that concatenate alike', async () => {
    const cache = createMemoryReplayCache({ now });
    expect(await cache.remember('t|https://a', 'b', 'j', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'https://a|b', 'j', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', '["https://a","b"]', 'j', inSeconds(60))).to.equal(true);
  });

  // One tenant's EHR at its share must not get another tenant on the same issuer refused.
  it('gives each tenant of an issuer its own share', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 10, maxPerIssuer: 3 });
    for (let i = 1; i <= 7; i++) {
      expect(await cache.remember('busy', 'https://ehr', String(i), inSeconds(60))).to.equal(true);
    }
    expect(
      await cache.remember('busy', 'https://ehr', '8', inSeconds(60)).catch((e: unknown) => e),
    ).to.be.instanceOf(ReplayIssuerQuotaError);
    for (const j of ['a', 'b', 'c']) {
      expect(await cache.remember('quiet', 'https://ehr', j, inSeconds(60))).to.equal(true);
    }
    // The last share is used: the cache is full, every tenant is refused (nothing forgotten).
    expect(
      await cache.remember('quiet', 'https://ehr', 'd', inSeconds(60)).catch((e: unknown) => e),
    ).to.be.instanceOf(ReplayCacheFullError);
  });

  it('refuses new entries when full of unexpired ones, and never forgets them', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 3 });
    for (const j of ['1', '2', '3']) {
      expect(await cache.remember('t', 'iss', j, inSeconds(60))).to.equal(true);
    }
    let refused: unknown;
    try {
      await cache.remember('t', 'iss', '4', inSeconds(60));
    } catch (err) {
      refused = err;
    }
    expect(refused).to.be.instanceOf(ReplayCacheFullError);
    for (const j of ['1', '2', '3']) {
      expect(await cache.remember('t', 'iss', j, inSeconds(60))).to.equal(false);
    }
    expect(cache.size()).to.equal(3);
  });

  // One tenant's EHR minting tokens fast (or with long lifetimes) must not lock out the others.
  it('lets a busy issuer use all but the last share of the cache, kept for the others', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 10, maxPerIssuer: 3 });
    // Alone, a busy issuer goes past its share while more than a share of places is free.
    for (let i = 1; i <= 7; i++) {
      expect(await cache.remember('t', 'https://greedy', String(i), inSeconds(3600))).to.equal(
        true,
      );
    }
    const refused = await cache.remember('t', 'https://greedy', '8', inSeconds(60)).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(refused).to.be.instanceOf(ReplayIssuerQuotaError);
    expect((refused as ReplayIssuerQuotaError).maxPerIssuer).to.equal(3);
    // Its remembered tokens are still replays (never forgotten); the last share is the others'.
    expect(await cache.remember('t', 'https://greedy', '2', inSeconds(3600))).to.equal(false);
    expect(await cache.remember('t', 'https://other', 'a', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'https://third', 'a', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'https://other', 'b', inSeconds(60))).to.equal(true);
    expect(cache.size()).to.equal(10);
    // Full: now everyone is refused (the cache never forgets an unexpired token).
    expect(
      await cache.remember('t', 'https://fourth', 'a', inSeconds(60)).catch((e: unknown) => e),
    ).to.be.instanceOf(ReplayCacheFullError);
  });

  it('holds the last share for issuers under theirs, however many issuers are busy', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 12, maxPerIssuer: 4 });
    // Two busy issuers fill 8 places between them (4 each, their share): the last 4 are kept.
    for (const iss of ['https://busy-1', 'https://busy-2']) {
      for (let i = 0; i < 4; i++) {
        expect(await cache.remember('t', iss, String(i), inSeconds(60))).to.equal(true);
      }
    }
    for (const iss of ['https://busy-1', 'https://busy-2']) {
      expect(
        await cache.remember('t', iss, 'more', inSeconds(60)).catch((e: unknown) => e),
      ).to.be.instanceOf(ReplayIssuerQuotaError);
    }
    for (let i = 0; i < 4; i++) {
      expect(await cache.remember('t', `https://light-${i}`, 'a', inSeconds(60))).to.equal(true);
    }
  });

  it('gives an issuer its room back as entries expire', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 4, maxPerIssuer: 2 });
    await cache.remember('t', 'iss', 'short', inSeconds(5));
    await cache.remember('t', 'iss', 'long', inSeconds(600));
    expect(
      await cache.remember('t', 'iss', 'x', inSeconds(60)).catch((e: unknown) => e),
    ).to.be.instanceOf(ReplayIssuerQuotaError);
    nowMs += 10_000;
    expect(await cache.remember('t', 'iss', 'x', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'iss', 'long', inSeconds(600))).to.equal(false);
  });

  it('gives each issuer a share of 25,000 by default, or the whole cache if smaller', async () => {
    const small = createMemoryReplayCache({ now, maxEntries: 2 });
    await small.remember('t', 'iss', '1', inSeconds(60));
    await small.remember('t', 'iss', '2', inSeconds(60));
    // Full (the issuer's default share is the whole cache): the cache-full refusal.
    expect(
      await small.remember('t', 'iss', '3', inSeconds(60)).catch((e: unknown) => e),
    ).to.be.instanceOf(ReplayCacheFullError);
    // 30,000 places, a share of 25,000: a busy issuer stops at 25,000, the others go on.
    const big = createMemoryReplayCache({ now, maxEntries: 30_000 });
    for (let i = 0; i < 25_000; i++) {
      await big.remember('t', 'iss', String(i), inSeconds(60));
    }
    expect(
      await big.remember('t', 'iss', 'one more', inSeconds(60)).catch((e: unknown) => e),
    ).to.be.instanceOf(ReplayIssuerQuotaError);
    expect(await big.remember('t', 'other', 'one more', inSeconds(60))).to.equal(true);
  });

  it('refuses a share that is not a positive integer', () => {
    expect(() => createMemoryReplayCache({ maxPerIssuer: 0 })).to.throw(RangeError, /maxPerIssuer/);
    expect(() => createMemoryReplayCache({ maxPerIssuer: 1.5 })).to.throw(
      RangeError,
      /maxPerIssuer/,
    );
  });

  it('refuses a share larger than the whole cache (the default share is clamped to it)', () => {
    expect(() => createMemoryReplayCache({ maxEntries: 10, maxPerIssuer: 11 })).to.throw(
      RangeError,
      /maxPerIssuer \(11\) exceeds maxEntries \(10\)/,
    );
    expect(() => createMemoryReplayCache({ maxEntries: 10 })).not.to.throw();
  });

  it('prunes expired entries to make room', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 2 });
    await cache.remember('t', 'iss', 'short', inSeconds(5));
    await cache.remember('t', 'iss', 'long', inSeconds(600));
    nowMs += 10_000;
    expect(await cache.remember('t', 'iss', 'new', inSeconds(60))).to.equal(true);
    expect(cache.size()).to.equal(2);
    expect(await cache.remember('t', 'iss', 'long', inSeconds(600))).to.equal(false);
  });

  // Expired entries leave earliest first (a heap), whatever order their expiries came in.
  it('drops expired entries in expiry order, not insertion order, to make room', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 3 });
    await cache.remember('t', 'iss', 'late', inSeconds(600));
    await cache.remember('t', 'iss', 'early', inSeconds(5));
    await cache.remember('t', 'iss', 'middle', inSeconds(60));
    nowMs += 10_000; // only 'early' expired
    expect(await cache.remember('t', 'iss', 'new', inSeconds(60))).to.equal(true);
    expect(await cache.remember('t', 'iss', 'late', inSeconds(600))).to.equal(false);
    expect(await cache.remember('t', 'iss', 'middle', inSeconds(60))).to.equal(false);
    expect(cache.size()).to.equal(3);
  });

  // A pair seen again after its expiry is remembered anew, until its new expiry only.
  it('keeps a pair remembered again after its expiry until its new expiry', async () => {
    const cache = createMemoryReplayCache({ now, maxEntries: 10 });
    await cache.remember('t', 'iss', 'j', inSeconds(5));
    nowMs += 6_000;
    expect(await cache.remember('t', 'iss', 'j', inSeconds(120))).to.equal(true);
    nowMs += 60_000; // past the first expiry, before the second
    await cache.remember('t', 'iss', 'other', inSeconds(120));
    expect(await cache.remember('t', 'iss', 'j', inSeconds(120))).to.equal(false);
    nowMs += 61_000; // past the second
    expect(await cache.remember('t', 'iss', 'j', inSeconds(120))).to.equal(true);
  });

  // Against a model that scans everything: same answers, same size, whatever the tenants, the
  // issuers, the expiries, the clock steps, the capacity and the (tenant, issuer) share.
  it('answers and prunes exactly like a full scan would (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        // A share up to the whole cache (a larger one is refused: spec above).
        fc
          .integer({ min: 1, max: 8 })
          .chain((size) => fc.tuple(fc.constant(size), fc.integer({ min: 1, max: size }))),
        fc.array(
          fc.record({
            tenant: fc.constantFrom('t1', 't2'),
            iss: fc.constantFrom('a', 'b', 'c'),
            jti: fc.constantFrom('a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j'),
            life: fc.integer({ min: 1, max: 50 }),
            step: fc.integer({ min: 0, max: 20 }),
          }),
          { maxLength: 80 },
        ),
        async ([maxEntries, maxPerIssuer], calls) => {
          nowMs = Date.parse('2025-06-01T12:00:00Z');
          const cache = createMemoryReplayCache({ now, maxEntries, maxPerIssuer });
          /** "tenant iss jti" -> expiry (s) */
          const model = new Map<string, number>();
          for (const { tenant, iss, jti, life, step } of calls) {
            nowMs += step * 1000;
            const exp = inSeconds(life);
            const key = `${tenant} ${iss} ${jti}`;
            const known = model.get(key);
            let expected: boolean | 'full' | 'quota';
            if (known !== undefined && known * 1000 > nowMs) {
              expected = false;
            } else {
              for (const [k, e] of model) {
                if (e * 1000 <= nowMs) {
                  model.delete(k);
                }
              }
              const held = [...model.keys()].filter((k) =>
                k.startsWith(`${tenant} ${iss} `),
              ).length;
              expected =
                model.size >= maxEntries
                  ? 'full'
                  : held >= maxPerIssuer && model.size >= maxEntries - maxPerIssuer
                    ? 'quota'
                    : true;
              if (expected === true) {
                model.set(key, exp);
              }
            }
            const got = await cache.remember(tenant, iss, jti, exp).catch((err: unknown) => {
              if (err instanceof ReplayCacheFullError) {
                return 'full' as const;
              }
              expect(err).to.be.instanceOf(ReplayIssuerQuotaError);
              return 'quota' as const;
            });
            expect(got).to.equal(expected);
            expect(cache.size()).to.equal(model.size);
          }
        },
      ),
    );
  });

  it('answers true exactly for the first sighting of each unexpired entry (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.tuple(
            fc.constantFrom('t1', 't2', 't|'),
            fc.constantFrom('https://a', 'https://b', '|https://a'),
            fc.string({ maxLength: 4 }),
          ),
          { maxLength: 60 },
        ),
        async (triples) => {
          const cache = createMemoryReplayCache({ now });
          const seen = new Set<string>();
          for (const [tenant, iss, jti] of triples) {
            const key = JSON.stringify([tenant, iss, jti]);
            expect(await cache.remember(tenant, iss, jti, inSeconds(300))).to.equal(!seen.has(key));
            seen.add(key);
          }
        },
      ),
    );
  });
});
