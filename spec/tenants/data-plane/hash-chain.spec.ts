import { expect } from 'chai';
import fc from 'fast-check';
import {
  GENESIS_HASH,
  canonicalJson,
  chainHash,
  nextChainEntry,
  verifyChain,
} from '../../../tenants/data-plane.ts';
import type { ChainEntry, ChainHead } from '../../../tenants/data-plane.ts';

function buildChain(n: number): { entries: ChainEntry[]; head: ChainHead } {
  const entries: ChainEntry[] = [];
  let head: ChainHead | undefined;
  for (let i = 1; i <= n; i += 1) {
    const e = nextChainEntry(head, { type: 'key.unwrap', detail: { version: i } });
    entries.push(e);
    head = { seq: e.seq, hash: e.hash };
  }
  return { entries, head: head ?? { seq: 0, hash: GENESIS_HASH } };
}

describe('tenants/ data plane: hash chain (pure)', () => {
  it('hashes sha256(prevHash || canonicalJson({ seq, event })) with sorted keys', () => {
    expect(canonicalJson({ b: 1, a: [true, null, 'x'], c: undefined })).to.equal(
      '{"a":[true,null,"x"],"b":1}',
    );
    const e = nextChainEntry(undefined, { z: 1, a: 2 });
    expect(e.seq).to.equal(1);
    expect(e.prevHash).to.equal(GENESIS_HASH);
    expect(e.hash).to.equal(chainHash(GENESIS_HASH, 1, { a: 2, z: 1 }));
  });

  it('refuses values canonical JSON cannot represent exactly', () => {
    for (const bad of [NaN, Infinity, 10n, () => 1, [undefined]]) {
      expect(() => canonicalJson(bad)).to.throw(TypeError);
    }
  });

  it('verifies an intact chain against its anchor', () => {
    const { entries, head } = buildChain(6);
    expect(verifyChain(entries, head)).to.deep.equal({ ok: true, count: 6 });
    expect(verifyChain([], { seq: 0, hash: GENESIS_HASH })).to.deep.equal({ ok: true, count: 0 });
  });

  const tampering: Array<[string, (entries: ChainEntry[]) => ChainEntry[], number, string]> = [
    [
      'an edited event',
      (es) =>
        es.map((e) =>
          e.seq === 3 ? { ...e, event: { type: 'key.unwrap', detail: { version: 99 } } } : e,
        ),
      3,
      'hash_mismatch',
    ],
    ['a deleted middle event', (es) => es.filter((e) => e.seq !== 3), 3, 'seq_gap'],
    ['a deleted last event', (es) => es.slice(0, -1), 6, 'anchor_mismatch'],
    [
      'two reordered events (seq swapped)',
      (es) =>
        es.map((e) =>
          e.seq === 2 ? { ...es[2]!, seq: 2 } : e.seq === 3 ? { ...es[1]!, seq: 3 } : e,
        ),
      2,
      'broken_link',
    ],
    [
      'a recomputed hash after an edit',
      (es) =>
        es.map((e) => {
          if (e.seq !== 4) {
            return e;
          }
          const event = { type: 'forged' };
          return { ...e, event, hash: chainHash(e.prevHash, e.seq, event) };
        }),
      5,
      'broken_link',
    ],
  ];
  for (const [name, tamper, firstBad, problem] of tampering) {
    it(`detects ${name}`, () => {
      const { entries, head } = buildChain(6);
      const result = verifyChain(tamper(entries), head);
      expect(result.ok).to.equal(false);
      expect(result.firstBadSeq).to.equal(firstBad);
      expect(result.problem).to.equal(problem);
    });
  }

  it('detects the deletion of any single event (property)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 20 }), fc.nat(), (n, pick) => {
        const { entries, head } = buildChain(n);
        const drop = (pick % n) + 1;
        const result = verifyChain(
          entries.filter((e) => e.seq !== drop),
          head,
        );
        return !result.ok && result.firstBadSeq === drop;
      }),
    );
  });
});
