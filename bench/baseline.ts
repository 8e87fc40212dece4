/**
 * The end-to-end baseline: a bare Express app that does the least a CDS service must do for
 * an order-sign call, and nothing else. It parses the same JSON body (same size limit),
 * verifies the same JWT with Node's crypto (`crypto.verify` with the issuer's public key;
 * ES384 or RS384; `iss`, `aud`, `exp`, `iat` checked), and answers with a constant card.
 * No rules, no tenants, no replay cache, no persistence, no logging.
 *
 * Run as its own process: `node --import tsx bench/baseline.ts <config.json>`, where the
 * config names the port, the public base URL `aud` is built from, and the issuers' public JWKs.
 */
import crypto from 'node:crypto';
import type { KeyObject } from 'node:crypto';
import fs from 'node:fs';
import express from 'express';

export interface BaselineConfig {
  port: number;
  publicUrl: string;
  /** Issuer -> public JWKs (each with kid and alg). */
  issuers: Record<string, Array<Record<string, unknown>>>;
  bodyLimitBytes: number;
}

const CARD = {
  cards: [
    {
      uuid: '6c1c3e35-6c2b-4d8e-9e3a-1c4c2f0e9a11',
      summary: 'Baseline: no rules evaluated',
      indicator: 'info',
      source: { label: 'cellcds bench baseline' },
    },
  ],
};

interface Key {
  alg: string;
  key: KeyObject;
}

function verify(
  authorization: string | undefined,
  audience: string,
  keys: Map<string, Key>,
): boolean {
  const m = /^Bearer ([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)$/.exec(
    authorization ?? '',
  );
  if (!m) {
    return false;
  }
  const [, h, p, s] = m as unknown as [string, string, string, string];
  let header: Record<string, unknown>;
  let claims: Record<string, unknown>;
  try {
    header = JSON.parse(Buffer.from(h, 'base64url').toString('utf8')) as Record<string, unknown>;
    claims = JSON.parse(Buffer.from(p, 'base64url').toString('utf8')) as Record<string, unknown>;
  } catch {
    return false;
  }
  const entry = keys.get(`${String(claims.iss)}|${String(header.kid)}`);
  if (!entry || header.alg !== entry.alg) {
    return false;
  }
  const data = Buffer.from(`${h}.${p}`);
  const sig = Buffer.from(s, 'base64url');
  const ok =
    entry.alg === 'ES384'
      ? crypto.verify('sha384', data, { key: entry.key, dsaEncoding: 'ieee-p1363' }, sig)
      : crypto.verify('sha384', data, entry.key, sig);
  const now = Math.floor(Date.now() / 1000);
  return (
    ok &&
    claims.aud === audience &&
    typeof claims.exp === 'number' &&
    claims.exp > now - 60 &&
    typeof claims.iat === 'number' &&
    claims.iat <= now + 60
  );
}

/** Builds the baseline app. */
export function createBaselineApp(config: BaselineConfig): express.Express {
  const keys = new Map<string, Key>();
  for (const [iss, jwks] of Object.entries(config.issuers)) {
    for (const jwk of jwks) {
      keys.set(`${iss}|${String(jwk.kid)}`, {
        alg: String(jwk.alg),
        key: crypto.createPublicKey({ key: jwk as crypto.JsonWebKey, format: 'jwk' }),
      });
    }
  }
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);
  app.post(
    '/cds-services/:id',
    express.json({ limit: config.bodyLimitBytes, type: ['application/json'] }),
    (req, res) => {
      const id = (req.params as Record<string, string>).id ?? '';
      if (!verify(req.headers.authorization, `${config.publicUrl}/cds-services/${id}`, keys)) {
        res.status(401).json({ error: 'invalid_token' });
        return;
      }
      const body = req.body as Record<string, unknown> | undefined;
      if (typeof body?.hook !== 'string' || typeof body.context !== 'object') {
        res.status(400).json({ error: 'invalid_request' });
        return;
      }
      res.json(CARD);
    },
  );
  return app;
}

function main(): void {
  const file = process.argv[2];
  if (!file) {
    throw new Error('usage: baseline.ts <config.json>');
  }
  const config = JSON.parse(fs.readFileSync(file, 'utf8')) as BaselineConfig;
  createBaselineApp(config).listen(config.port, '127.0.0.1');
}

main();
