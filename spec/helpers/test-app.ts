/**
 * buildTestApp: the real app on a temp data directory of SQLite files, with a bootstrap
 * operator token, the shipped pack uploaded, and helpers to register tenants with a
 * TestIssuer. Every spec builds its own; nothing is shared between specs.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Express } from 'express';
import request from 'supertest';
import { createApp } from '../../server/app.ts';
import { buildDeps } from '../../server/bootstrap.ts';
import { loadConfig } from '../../server/config.ts';
import type { Deps } from '../../server/context.ts';
import { readPackFile, SHIPPED_PACK_FILE } from '../../server/demo.ts';
import { createLogger } from '../../server/logger.ts';
import { TestIssuer } from './test-issuer.ts';

export const PUBLIC_URL = 'https://cds.test.example';

export interface TestApp {
  app: Express;
  deps: Deps;
  dataDir: string;
  adminToken: string;
  /** Captured log lines (JSON strings). */
  logLines: string[];
  /** Upload a pack (raw object) as the operator. */
  uploadPack(raw: unknown): Promise<request.Response>;
  /** Create a tenant with its own issuer, subscribed to the given packs. */
  addTenant(
    id: string,
    opts?: {
      subscriptions?: Array<{ pack: string; version: string }>;
      fhirServers?: string[];
      issuer?: TestIssuer;
    },
  ): Promise<TestIssuer>;
  close(): Promise<void>;
}

let shippedPack: unknown;
/** The shipped medication-safety pack, resolved for upload (cached per process). */
export function shippedPackRaw(): unknown {
  shippedPack ??= readPackFile(SHIPPED_PACK_FILE);
  return shippedPack;
}

/** The shipped pack's version (specs that subscribe to it follow its releases). */
export function shippedPackVersion(): string {
  const version = (shippedPackRaw() as { version?: unknown }).version;
  if (typeof version !== 'string') {
    throw new Error(`${SHIPPED_PACK_FILE} has no version`);
  }
  return version;
}

export async function buildTestApp(env: Record<string, string> = {}): Promise<TestApp> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-app-'));
  const adminToken = `test-operator-${crypto.randomBytes(24).toString('hex')}`;
  const config = loadConfig({
    CELLCDS_DATA_DIR: dataDir,
    CELLCDS_PUBLIC_URL: PUBLIC_URL,
    CELLCDS_ADMIN_TOKEN: adminToken,
    CELLCDS_LOG_LEVEL: 'info',
    CELLCDS_PREFETCH_TIMEOUT_MS: '1000',
    // The specs' small packs (tinyPack...) carry no tests; a spec about coverage sets 'required'.
    CELLCDS_PACK_TEST_COVERAGE: 'off',
    ...env,
  });
  const logLines: string[] = [];
  const log = createLogger({
    level: 'info',
    destination: { write: (line: string) => void logLines.push(line) },
  });
  const deps = await buildDeps(config, log);
  const app = createApp(deps);
  const t: TestApp = {
    app,
    deps,
    dataDir,
    adminToken,
    logLines,
    uploadPack: (raw) =>
      request(app)
        .post('/admin/rule-packs')
        .set('authorization', `Bearer ${adminToken}`)
        .send(raw as object),
    async addTenant(id, opts = {}) {
      const issuer =
        opts.issuer ?? (await TestIssuer.create({ iss: `https://ehr-${id}.test.example` }));
      const res = await request(app)
        .post('/admin/tenants')
        .set('authorization', `Bearer ${adminToken}`)
        .send({
          id,
          name: `Tenant ${id}`,
          region: config.region,
          issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
          fhirServers: opts.fhirServers ?? [],
        });
      if (res.status !== 201) {
        throw new Error(`addTenant ${id}: ${res.status} ${JSON.stringify(res.body)}`);
      }
      if (opts.subscriptions) {
        const sub = await request(app)
          .put(`/admin/tenants/${id}/subscriptions`)
          .set('authorization', `Bearer ${adminToken}`)
          .send(opts.subscriptions);
        if (sub.status !== 200) {
          throw new Error(`subscribe ${id}: ${sub.status} ${JSON.stringify(sub.body)}`);
        }
      }
      return issuer;
    },
    async close() {
      await deps.close();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
  return t;
}
