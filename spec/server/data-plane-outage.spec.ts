/**
 * A region whose PostgreSQL stops answering or refuses connections (scale-out review, finding
 * 3): calls fail within the configured timeouts instead of hanging, with 503 `unavailable` (no
 * connection string, no PHI), and /readyz takes the plane out of rotation. The database sits
 * behind a throwaway TCP proxy and in a throwaway database; the real server keeps running.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import request from 'supertest';
import { toServiceError } from '../../server/error-handler.ts';
import { buildTestApp, PUBLIC_URL } from '../helpers/test-app.ts';
import type { TestApp } from '../helpers/test-app.ts';
import { startTcpProxy } from '../tenants/data-plane/tcp-proxy.ts';
import type { TcpProxy } from '../tenants/data-plane/tcp-proxy.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;

/** Settles `p`, or fails the test after `ms` (a call that hangs is the bug). */
async function within<T>(ms: number, p: Promise<T>): Promise<{ value?: T; error?: unknown }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new Error(`still pending after ${String(ms)} ms`));
    }, ms);
  });
  try {
    return { value: await Promise.race([p, timeout]) };
  } catch (error) {
    if (error instanceof Error && error.message.startsWith('still pending')) {
      throw error;
    }
    return { error };
  } finally {
    clearTimeout(timer);
  }
}

(PG_URL ? describe : describe.skip)(
  'server: the region database down or stalled [postgres]',
  () => {
    const db = `cellcds_spec_outage_${crypto.randomBytes(4).toString('hex')}`;
    let root: Sequelize;
    let proxy: TcpProxy;
    let t: TestApp;
    let dir: string;

    before(async () => {
      root = new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false, pool: { max: 1 } });
      await root.query(`CREATE DATABASE "${db}"`);
      const url = new URL(PG_URL ?? '');
      url.pathname = `/${db}`;
      proxy = await startTcpProxy(url.toString());
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-outage-'));
      const regions = path.join(dir, 'regions.json');
      fs.writeFileSync(
        regions,
        JSON.stringify({
          regions: [
            {
              id: 'r1',
              jurisdiction: 'US',
              publicUrl: PUBLIC_URL,
              storage: { postgresUrl: proxy.url },
              backupDir: path.join(dir, 'backups'),
              keyProvider: { kind: 'local-keyring', dir: path.join(dir, 'keys') },
            },
          ],
        }),
      );
      t = await buildTestApp({
        CELLCDS_REGIONS_FILE: regions,
        CELLCDS_REGION: 'r1',
        CELLCDS_SEED_DEMO: 'false',
        CELLCDS_PG_STATEMENT_TIMEOUT_MS: '500',
        CELLCDS_PG_ACQUIRE_TIMEOUT_MS: '500',
      });
      await t.deps.stores.provisionTenant('hosp');
    });
    after(async () => {
      proxy.resume();
      proxy.maxConns = Number.POSITIVE_INFINITY;
      await t.close();
      await proxy.close();
      await root.query(`DROP DATABASE IF EXISTS "${db}" WITH (FORCE)`);
      await root.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    afterEach(() => {
      proxy.resume();
      proxy.maxConns = Number.POSITIVE_INFINITY;
    });

    it('is ready while the database answers', async () => {
      const res = await request(t.app).get('/readyz');
      expect(res.status).to.equal(200);
      expect(res.body.dataPlane).to.equal('ok');
    });

    it('a stalled database: calls fail within the timeouts with 503 unavailable, and /readyz is 503', async () => {
      proxy.stall();
      const started = Date.now();
      const { error } = await within(
        4_000,
        t.deps.stores.store('hosp').listInvocations({ limit: 1 }),
      );
      expect(error, 'the call must fail, not succeed').to.be.instanceOf(Error);
      expect(Date.now() - started).to.be.below(4_000);
      const se = toServiceError(error);
      expect([se.status, se.code, se.message]).to.deep.equal([
        503,
        'unavailable',
        'data store unavailable',
      ]);
      const ready = await within(4_000, request(t.app).get('/readyz'));
      expect(ready.value?.status).to.equal(503);
      expect(ready.value?.body.dataPlane).to.equal('down');
    });

    it('a database that refuses connections: 503 unavailable naming no host or URL', async () => {
      proxy.maxConns = 0;
      proxy.dropAll();
      const { error } = await within(4_000, t.deps.stores.store('hosp').listInvocations());
      const se = toServiceError(error);
      expect([se.status, se.code]).to.deep.equal([503, 'unavailable']);
      expect(JSON.stringify({ message: se.message, body: se.body })).not.to.match(
        /postgres|127\.0\.0\.1|hosp/,
      );
      const ready = await within(4_000, request(t.app).get('/readyz'));
      expect(ready.value?.status).to.equal(503);
    });

    it('recovers once the database answers again', async () => {
      const { value } = await within(
        4_000,
        t.deps.stores.store('hosp').listInvocations({ limit: 1 }),
      );
      expect(value).to.deep.equal([]);
      expect((await request(t.app).get('/readyz')).status).to.equal(200);
    });
  },
);
