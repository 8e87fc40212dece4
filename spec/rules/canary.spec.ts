import { expect } from 'chai';
import { createHash } from 'node:crypto';
import { canaryBucket, chooseVersion } from '../../rules/index.ts';
import type { Subscription } from '../../rules/index.ts';

const sub = (percent: number): Subscription => ({
  pack: 'medication-safety',
  version: '1.0.0',
  canary: { version: '1.1.0', percent },
});

function canaryShare(s: Subscription, instances: readonly string[]): number {
  return instances.filter((h) => chooseVersion(s, h) === '1.1.0').length / instances.length;
}

describe('rules: canary routing', () => {
  // 1,000 random v4 UUIDs from a seeded generator, so that a run is reproducible.
  const instances = Array.from({ length: 1000 }, (_, i) => {
    const h = createHash('sha256').update(`seed-7|${i}`).digest('hex');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
  });

  it('is deterministic by hookInstance', () => {
    for (const h of instances.slice(0, 50)) {
      const first = chooseVersion(sub(30), h);
      for (let i = 0; i < 5; i++) {
        expect(chooseVersion(sub(30), h)).to.equal(first);
      }
    }
  });

  for (const percent of [5, 20, 50, 80]) {
    it(`routes about ${percent}% of 1,000 random hook instances to the canary`, () => {
      const share = canaryShare(sub(percent), instances) * 100;
      expect(share).to.be.within(percent - 5, percent + 5);
    });
  }

  it('is exact at 0% and 100%, and without a canary', () => {
    expect(canaryShare(sub(0), instances)).to.equal(0);
    expect(canaryShare(sub(100), instances)).to.equal(1);
    const pinned: Subscription = { pack: 'medication-safety', version: '1.0.0' };
    expect(instances.every((h) => chooseVersion(pinned, h) === '1.0.0')).to.equal(true);
  });

  it('falls back to the pinned version for a nonsense percent', () => {
    expect(canaryShare(sub(Number.NaN), instances)).to.equal(0);
    expect(canaryShare(sub(-10), instances)).to.equal(0);
  });

  it('widening the canary only adds instances: each one keeps its bucket', () => {
    const at10 = new Set(instances.filter((h) => chooseVersion(sub(10), h) === '1.1.0'));
    const at30 = new Set(instances.filter((h) => chooseVersion(sub(30), h) === '1.1.0'));
    for (const h of at10) {
      expect(at30.has(h)).to.equal(true);
    }
  });

  it('rollback (repointing the subscription) applies to the very next call', () => {
    const h = instances.find((x) => chooseVersion(sub(50), x) === '1.1.0')!;
    expect(chooseVersion(sub(50), h)).to.equal('1.1.0');
    const rolledBack: Subscription = { pack: 'medication-safety', version: '1.0.0' };
    expect(chooseVersion(rolledBack, h)).to.equal('1.0.0');
  });

  it('buckets by pack too: another pack splits the same instances differently', () => {
    const a = instances.map((h) => canaryBucket('medication-safety', h));
    const b = instances.map((h) => canaryBucket('other-pack', h));
    expect(a.every((x) => x >= 0 && x < 10_000)).to.equal(true);
    expect(a.filter((x, i) => x === b[i]).length).to.be.below(10);
  });
});
