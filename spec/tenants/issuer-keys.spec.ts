/**
 * The verifiers' cache of inline key sets (tenants/jwt-common.ts createIssuerKeys): bounded,
 * least recently used dropped first, so a deployment with more tenants than the bound does not
 * rebuild every tenant's keys on every call (issue 6: 10,000 tenants).
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import { createJwksFetcher } from '../../tenants/jwks-fetcher.ts';
import { createIssuerKeys } from '../../tenants/jwt-common.ts';
import type { TrustedIssuer } from '../../tenants/types.ts';

/** One public key; each registration names it with its own kid, so each JWK Set differs. */
const PUBLIC_JWK = crypto
  .createPublicKey(
    crypto
      .generateKeyPairSync('ec', { namedCurve: 'P-384' })
      .publicKey.export({ format: 'pem', type: 'spki' }),
  )
  .export({ format: 'jwk' });

function registration(n: number): TrustedIssuer {
  return {
    iss: `https://ehr-${n}.example`,
    jwks: { keys: [{ ...PUBLIC_JWK, kid: `k-${n}`, alg: 'ES384', use: 'sig' }] },
  };
}

describe("tenants: the verifiers' cache of inline key sets", () => {
  const fetcher = createJwksFetcher();

  it('drops the least recently used set when full, not every set', async () => {
    const keys = createIssuerKeys({ fetcher, maxInlineStores: 3 });
    const use = async (n: number) => {
      const store = await keys.keysFor(registration(n), { alg: 'ES384' }, `k-${n}`);
      expect(store.kids.has(`k-${n}`)).to.equal(true);
    };
    await use(1);
    await use(2);
    await use(3);
    expect(keys.stats()).to.deep.equal({ inlineBuilt: 3, inlineKept: 3 });
    await use(1); // a hit: 1 is now the most recent
    await use(4); // full: drops 2, the least recently used
    expect(keys.stats()).to.deep.equal({ inlineBuilt: 4, inlineKept: 3 });
    await use(1);
    await use(3);
    await use(4);
    expect(keys.stats().inlineBuilt).to.equal(4);
    await use(2); // dropped before: built again
    expect(keys.stats()).to.deep.equal({ inlineBuilt: 5, inlineKept: 3 });
  });

  it('keeps the sets of 1,100 tenants by default: a second round of calls builds none', async () => {
    const keys = createIssuerKeys({ fetcher });
    for (let round = 0; round < 2; round++) {
      for (let n = 0; n < 1100; n++) {
        await keys.keysFor(registration(n), { alg: 'ES384' }, `k-${n}`);
      }
    }
    expect(keys.stats()).to.deep.equal({ inlineBuilt: 1100, inlineKept: 1100 });
  });

  it('still refuses a kid the set does not have', async () => {
    const keys = createIssuerKeys({ fetcher });
    try {
      await keys.keysFor(registration(1), { alg: 'ES384' }, 'k-2');
      expect.fail('expected unknown_kid');
    } catch (err) {
      expect((err as { reason?: string }).reason).to.equal('unknown_kid');
    }
  });
});
