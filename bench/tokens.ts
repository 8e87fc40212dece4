/**
 * CDS client keys and JWTs for the bench, with Node's crypto only: an EHR's signing key
 * (ES384 on P-384, or RS384 on RSA-2048), its public JWK to register, and compact JWS tokens
 * carrying a unique `jti` each.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';

/** The client signature algorithms the end-to-end section runs. */
export const BENCH_ALGS = ['ES384', 'RS384'] as const;
export type BenchAlg = (typeof BENCH_ALGS)[number];

/** A signing key as the load client receives it (PEM, so it crosses a process boundary). */
export interface ClientKey {
  alg: BenchAlg;
  kid: string;
  iss: string;
  /** PKCS#8 PEM of the private key. */
  privatePem: string;
  /** The public JWK (kid, alg, use) to register with the issuer. */
  publicJwk: Record<string, unknown>;
}

/** Generates an EHR signing key for `alg`. */
export function createClientKey(
  alg: BenchAlg,
  iss: string,
  kid = `${alg.toLowerCase()}-${crypto.randomUUID()}`,
): ClientKey {
  // PEM straight from the key generation, and the JWK from a key object parsed from it: Node
  // 20 can deadlock exporting a JWK from the key objects generateKeyPairSync returns (the
  // export holds the key's mutex while allocating; a GC then finalizes the finished key
  // generation job, whose destructor takes the same mutex). Seen once in the tenants section,
  // which generates 1,000 keys (gdb: ExportJWKEcKey -> GC -> ~KeyGenJob -> mutex lock).
  const publicKeyEncoding = { type: 'spki', format: 'pem' } as const;
  const privateKeyEncoding = { type: 'pkcs8', format: 'pem' } as const;
  const { privateKey, publicKey } =
    alg === 'ES384'
      ? crypto.generateKeyPairSync('ec', {
          namedCurve: 'P-384',
          publicKeyEncoding,
          privateKeyEncoding,
        })
      : crypto.generateKeyPairSync('rsa', {
          modulusLength: 2048,
          publicKeyEncoding,
          privateKeyEncoding,
        });
  return {
    alg,
    kid,
    iss,
    privatePem: privateKey,
    publicJwk: {
      ...crypto.createPublicKey(publicKey).export({ format: 'jwk' }),
      kid,
      alg,
      use: 'sig',
    },
  };
}

const b64url = (v: string | Buffer) => Buffer.from(v).toString('base64url');

/** Signs a JWT (compact JWS) with a private key object. */
export function signJwt(
  alg: BenchAlg,
  kid: string,
  key: KeyObject,
  claims: Record<string, unknown>,
): string {
  const input = `${b64url(JSON.stringify({ alg, typ: 'JWT', kid }))}.${b64url(JSON.stringify(claims))}`;
  const sig =
    alg === 'ES384'
      ? crypto.sign('sha384', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' })
      : crypto.sign('sha384', Buffer.from(input), key);
  return `${input}.${sig.toString('base64url')}`;
}

/** What every token of a run carries besides a fresh `jti`. */
export interface TokenClaims {
  aud: string;
  tenant: string;
  /** Lifetime in seconds (default 3000, under the server's 3600 maximum). */
  lifetime?: number;
}

/** Signs `count` tokens for one key with unique jtis (`iat` now). */
export function signTokens(key: ClientKey, claims: TokenClaims, count: number): string[] {
  const privateKey = crypto.createPrivateKey(key.privatePem);
  const iat = Math.floor(Date.now() / 1000);
  const exp = iat + (claims.lifetime ?? 3000);
  const out: string[] = new Array<string>(count);
  for (let i = 0; i < count; i++) {
    out[i] = signJwt(key.alg, key.kid, privateKey, {
      iss: key.iss,
      aud: claims.aud,
      tenant: claims.tenant,
      iat,
      exp,
      jti: crypto.randomUUID(),
    });
  }
  return out;
}
