/**
 * A SQLite region whose disk is full or read-only (on-call review, finding C): store writes that
 * fail with SQLITE_FULL, SQLITE_IOERR*, SQLITE_READONLY, ENOSPC, EROFS or EDQUOT are retryable
 * 503 `unavailable` (not 500), /readyz's write probe sees the full disk, and both recover once
 * space is freed. SQLITE_FULL is provoked for real: `PRAGMA max_page_count` on a SQLite
 * database, and (where this process may mount one, as root in CI) a tiny tmpfs under the region.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import sqlite3 from 'sqlite3';
import request from 'supertest';
import { toServiceError } from '../../server/error-handler.ts';
import { isStoreUnavailableError } from '../../tenants/index.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL } from '../helpers/test-app.ts';
import type { TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

/** Runs `sql` on a raw sqlite3 connection; rejects with the driver's error. */
function run(db: sqlite3.Database, sql: string): Promise<void> {
  return new Promise((resolve, reject) => {
    db.run(sql, (err) => {
      if (err) {
        reject(err);
      } else {
        resolve();
      }
    });
  });
}

describe('server: a full or read-only SQLite disk is 503 unavailable, not 500', function () {
  this.timeout(60_000);
  let dir: string;

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-full-'));
  });
  after(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('maps a real SQLITE_FULL (max_page_count reached) to 503 unavailable, raw or through Sequelize', async () => {
    const file = path.join(dir, 'full.sqlite');
    const db = new sqlite3.Database(file);
    await run(db, 'CREATE TABLE t (v BLOB)');
    await run(db, 'PRAGMA max_page_count = 2');
    const raw = await run(db, `INSERT INTO t VALUES (zeroblob(100000))`).catch((e: unknown) => e);
    await new Promise<void>((r) => {
      db.close(() => {
        r();
      });
    });
    expect((raw as { code?: string }).code).to.equal('SQLITE_FULL');
    expect(isStoreUnavailableError(raw)).to.equal(true);

    const sequelize = new Sequelize({ dialect: 'sqlite', storage: file, logging: false });
    try {
      await sequelize.query('PRAGMA max_page_count = 2');
      const wrapped = await sequelize
        .query(`INSERT INTO t VALUES (zeroblob(100000))`, { type: QueryTypes.INSERT })
        .catch((e: unknown) => e);
      expect((wrapped as { parent?: { code?: string } }).parent?.code).to.equal('SQLITE_FULL');
      const se = toServiceError(wrapped);
      expect([se.status, se.code, se.message]).to.deep.equal([
        503,
        'unavailable',
        'data store unavailable',
      ]);
    } finally {
      await sequelize.close();
    }
  });

  it('maps the storage failures of the review (I/O, read-only, no space, quota) to 503', () => {
    for (const code of [
      'SQLITE_FULL',
      'SQLITE_IOERR',
      'SQLITE_IOERR_WRITE',
      'SQLITE_IOERR_FSYNC',
      'SQLITE_READONLY',
      'SQLITE_READONLY_DBMOVED',
      'ENOSPC',
      'EROFS',
      'EDQUOT',
    ]) {
      const err = Object.assign(new Error(`${code}: failed`), { code });
      expect(isStoreUnavailableError(err), code).to.equal(true);
      expect(toServiceError(err).status, code).to.equal(503);
    }
    for (const code of ['SQLITE_CONSTRAINT', 'SQLITE_ERROR', 'SQLITE_CORRUPT', 'ENOENT']) {
      const err = Object.assign(new Error(`${code}: failed`), { code });
      expect(isStoreUnavailableError(err), code).to.equal(false);
    }
  });
});

/** Mounts a tmpfs of `size` at `at`; false where this process may not (not root, no mount). */
function mountTmpfs(at: string, size: string): boolean {
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', at], {
    encoding: 'utf8',
  });
  return r.status === 0;
}

describe('server: hook calls and /readyz on a full region disk (tmpfs) [root]', function () {
  this.timeout(120_000);
  let root: string;
  let mount: string;
  let mounted = false;
  let t: TestApp;
  let issuer: TestIssuer;
  const filler = () => path.join(mount, 'filler');
  const call = async () =>
    request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set(
        'authorization',
        `Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/tiny-order-sign` })}`,
      )
      .send(warfarinNsaidRequest());

  before(async function () {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-tmpfs-'));
    mount = path.join(root, 'region-disk');
    fs.mkdirSync(mount);
    mounted = mountTmpfs(mount, '4m');
    if (!mounted) {
      this.skip(); // needs a tmpfs mount (root); the pragma spec above covers the mapping
    }
    const regions = path.join(root, 'regions.json');
    fs.writeFileSync(
      regions,
      JSON.stringify({
        regions: [
          {
            id: 'r1',
            jurisdiction: 'US',
            publicUrl: PUBLIC_URL,
            storage: { dataDir: mount },
            backupDir: path.join(root, 'backups'),
            keyProvider: { kind: 'local-keyring', dir: path.join(root, 'keys') },
          },
        ],
      }),
    );
    t = await buildTestApp({
      CELLCDS_REGIONS_FILE: regions,
      CELLCDS_REGION: 'r1',
      CELLCDS_SEED_DEMO: 'false',
    });
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await t.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
  });
  after(async () => {
    if (mounted) {
      await t.close();
      spawnSync('umount', [mount]);
    }
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('answers 503 unavailable with a requestId once the disk is full, and /readyz says ENOSPC', async () => {
    expect((await call()).status).to.equal(200);
    // Fill what is left of the region's disk.
    const fd = fs.openSync(filler(), 'w');
    try {
      const chunk = Buffer.alloc(64 * 1024, 1);
      for (;;) {
        fs.writeSync(fd, chunk);
      }
    } catch (err) {
      expect((err as { code?: string }).code).to.equal('ENOSPC');
    } finally {
      fs.closeSync(fd);
    }
    let failed: request.Response | undefined;
    for (let i = 0; i < 200 && !failed; i++) {
      const res = await call();
      if (res.status !== 200) {
        failed = res;
      }
    }
    expect(failed, 'a call fails once the disk is full').to.not.equal(undefined);
    expect(failed!.status, JSON.stringify(failed!.body)).to.equal(503);
    expect(failed!.body).to.include({ error: 'unavailable', message: 'data store unavailable' });
    expect(failed!.body.requestId).to.match(/^[0-9a-f-]{36}$/);
    expect(failed!.headers['x-request-id']).to.equal(failed!.body.requestId);
    const deadline = Date.now() + 5_000;
    let ready = await request(t.app).get('/readyz');
    while (ready.status === 200 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 200));
      ready = await request(t.app).get('/readyz');
    }
    expect(ready.status).to.equal(503);
    expect(ready.body).to.include({ dataPlane: 'down' });
    expect(ready.body.reasons.dataPlane).to.deep.equal({
      code: 'ENOSPC',
      message: 'data folder not writable (ENOSPC)',
    });
  });

  it('recovers once space is freed: calls answer 200 and /readyz is 200', async () => {
    fs.rmSync(filler());
    const res = await call();
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect((await request(t.app).get('/readyz')).status).to.equal(200);
  });
});
