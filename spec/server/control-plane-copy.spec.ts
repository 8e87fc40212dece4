/**
 * `cellcds control-plane copy` (docs/operations.md, "Scale-out"): a SQLite control plane built
 * by a real app is copied into PostgreSQL in one transaction; the target then answers as the
 * source did (issuers, packs, tokens, the audit chain and its head) and serves hook calls; the
 * copy refuses a non-empty target, a tampered source chain, a missing source and a source
 * written during the copy, writing nothing.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import sqlite3 from 'sqlite3';
import request from 'supertest';
import { ControlPlaneCopyError, copyControlPlane, openControlPlane } from '../../tenants/index.ts';
import type { ControlPlane } from '../../tenants/index.ts';
import { buildTestApp, PUBLIC_URL } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { runCliAsync } from '../helpers/processes.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;

describe('control-plane copy: SQLite -> PostgreSQL', function () {
  if (!PG_URL) {
    it('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    return;
  }
  this.timeout(180_000);
  const pgUrl = PG_URL;
  const tag = crypto.randomBytes(4).toString('hex');
  const schemas: string[] = [];
  const schemaNamed = (name: string) => {
    const s = `cellcds_cpc_${tag}_${name}`;
    schemas.push(s);
    return s;
  };
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  let dir: string;
  let dataDir: string;
  let source: string;
  let issuer: TestIssuer;
  let auditorToken: string;
  let sourceHead: { seq: number; hash: string };

  const root = () => new Sequelize(pgUrl, { dialect: 'postgres', logging: false });
  const count = async (schema: string, table: string): Promise<number> => {
    const db = root();
    try {
      const [rows] = await db.query(
        `SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = '${schema}' AND table_name = '${table}'`,
      );
      if (Number((rows as Array<{ n: string }>)[0]?.n) === 0) {
        return 0;
      }
      const [r] = await db.query(`SELECT count(*) AS n FROM "${schema}"."${table}"`);
      return Number((r as Array<{ n: string }>)[0]?.n);
    } finally {
      await db.close();
    }
  };
  const refusal = async (p: Promise<unknown>): Promise<ControlPlaneCopyError> => {
    try {
      await p;
    } catch (err) {
      expect(err).to.be.instanceOf(ControlPlaneCopyError);
      return err as ControlPlaneCopyError;
    }
    throw new Error('the copy was not refused');
  };
  const copyOf = (file: string, schema: string) =>
    copyControlPlane({ from: file, postgresUrl: pgUrl, schema });
  /** A copy of the source file (the file and its WAL folded in) for a hostile variant. */
  const cloneSource = async (name: string): Promise<string> => {
    const file = path.join(dir, `${name}.sqlite`);
    const cp = await openControlPlane({ storage: source });
    await cp.close();
    fs.copyFileSync(source, file);
    return file;
  };
  const sqliteExec = (file: string, sql: string) =>
    new Promise<void>((resolve, reject) => {
      const db = new sqlite3.Database(file, (err) => {
        if (err) {
          reject(err);
          return;
        }
        db.exec(sql, (e) => {
          db.close(() => {
            if (e) {
              reject(e);
            } else {
              resolve();
            }
          });
        });
      });
    });

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cpcopy-'));
    dataDir = path.join(dir, 'data');
    source = path.join(dataDir, 'control.sqlite');
    issuer = await TestIssuer.create({ iss: `https://ehr-cpc-${tag}.example` });
    // The source: a real app on its own SQLite control plane.
    const app = await buildTestApp({ CELLCDS_DATA_DIR: dataDir });
    try {
      expect((await app.uploadPack(tinyPack('tiny'))).status).to.equal(201);
      await app.addTenant('hosp', {
        subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
        fhirServers: ['https://fhir.hosp.example/r4'],
        issuer,
      });
      await app.addTenant('clinic', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
      const issued = await request(app.app)
        .post('/admin/tokens')
        .set('authorization', `Bearer ${app.adminToken}`)
        .send({ role: 'auditor', tenant: 'hosp', label: 'auditor' });
      expect(issued.status).to.equal(201);
      auditorToken = (issued.body as { token: string }).token;
      expect((await call(app.app)).status).to.equal(200);
    } finally {
      await app.close();
    }
    const cp = await openControlPlane({ storage: source });
    try {
      const events = await cp.audit.list();
      expect(events.length).to.be.greaterThan(3);
      expect(await cp.audit.verify()).to.include({ ok: true });
    } finally {
      await cp.close();
    }
  });
  after(async () => {
    const db = root();
    for (const s of schemas) {
      await db.query(`DROP SCHEMA IF EXISTS "${s}" CASCADE`);
    }
    await db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function call(app: Parameters<typeof request>[0], by = issuer) {
    return request(app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await by.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());
  }

  describe('a copy', () => {
    const schema = schemaNamed('ok');
    let cp: ControlPlane;
    let copied: Awaited<ReturnType<typeof copyControlPlane>>;
    const sourceBytes = () => crypto.createHash('sha256').update(fs.readFileSync(source));

    before(async () => {
      const before = sourceBytes().digest('hex');
      copied = await copyOf(source, schema);
      expect(sourceBytes().digest('hex'), 'the source file is untouched').to.equal(before);
      cp = await openControlPlane({ postgresUrl: pgUrl, schema });
      const head = await sqliteHead(source);
      sourceHead = head;
    });
    after(async () => {
      await cp.close();
    });

    it('copies every row: counts per table and the source head', async () => {
      expect(copied.counts).to.include({ tenants: 2, tenant_issuers: 2, packs: 1, audit_head: 1 });
      expect(copied.counts.admin_tokens).to.equal(1);
      expect(copied.sourceHead).to.deep.equal(sourceHead);
      expect(copied.targetHead.seq).to.equal(sourceHead.seq + 1);
      for (const table of ['tenants', 'tenant_issuers', 'packs', 'admin_tokens'] as const) {
        expect(await count(schema, table), table).to.equal(copied.counts[table]);
      }
      expect(await count(schema, 'audit_events')).to.equal(copied.counts.audit_events + 1);
    });

    it('answers lookups by issuer, the pack catalog and subscriptions as the source did', async () => {
      const found = await cp.tenants.findByIssuer(issuer.iss);
      expect(found.map((t) => t.id)).to.deep.equal(['hosp']);
      expect(found[0]?.fhirServers).to.deep.equal(['https://fhir.hosp.example/r4']);
      expect(found[0]?.subscriptions).to.deep.equal([{ pack: 'tiny', version: '1.0.0' }]);
      expect((await cp.packs.list()).map((p) => p.id)).to.include('tiny');
      expect((await cp.packs.get('tiny', '1.0.0')).hash).to.match(/^[0-9a-f]{64}$/);
      expect(await cp.tenants.activeFhirServers()).to.include('https://fhir.hosp.example/r4');
    });

    it('keeps admin tokens working (hashes as stored)', async () => {
      expect(await cp.adminTokens.authenticate(auditorToken)).to.include({
        role: 'auditor',
        tenant: 'hosp',
      });
    });

    it('keeps the audit chain: verifies, the source head is the link before control-plane.copied', async () => {
      expect(await cp.audit.verify()).to.deep.equal({ ok: true, count: sourceHead.seq + 1 });
      const events = await cp.audit.list();
      const last = events.at(-1);
      expect(last).to.include({ seq: sourceHead.seq + 1, type: 'control-plane.copied' });
      expect(last?.detail).to.include({
        source: 'sqlite',
        file: 'control.sqlite',
        tenants: 2,
        sourceHeadSeq: sourceHead.seq,
        sourceHeadHash: sourceHead.hash,
      });
      const db = root();
      try {
        const [rows] = await db.query(
          `SELECT seq, hash FROM "${schema}".audit_events WHERE seq = ${String(sourceHead.seq)}`,
        );
        expect(rows).to.deep.equal([sourceHead]);
      } finally {
        await db.close();
      }
    });

    it('continues the chain: the next append gets seq last + 1 and still verifies', async () => {
      const next = await cp.audit.record({ type: 'spec.after-copy', outcome: 'success' });
      expect(next.seq).to.equal(sourceHead.seq + 2);
      expect(await cp.audit.verify()).to.include({ ok: true, count: sourceHead.seq + 2 });
      // A raw insert relying on the serial default continues after it too (setval).
      const db = root();
      try {
        const [rows] = await db.query(
          `SELECT last_value FROM pg_sequences WHERE schemaname = '${schema}' AND sequencename LIKE 'audit_events_seq%'`,
        );
        expect(Number((rows as Array<{ last_value: string }>)[0]?.last_value)).to.equal(
          copied.targetHead.seq,
        );
      } finally {
        await db.close();
      }
    });

    it('serves a signed hook call for a copied tenant from a replica on the copy', async () => {
      const replica = await buildTestApp({
        CELLCDS_DATA_DIR: dataDir,
        CELLCDS_CONTROL_PLANE_URL: pgUrl,
        CELLCDS_CONTROL_PLANE_SCHEMA: schema,
      });
      try {
        const res = await call(replica.app);
        expect(res.status, JSON.stringify(res.body)).to.equal(200);
        expect((res.body as { cards: unknown[] }).cards).to.have.length.greaterThan(0);
        const me = await request(replica.app)
          .get('/admin/tenants/hosp/audit/verify')
          .set('authorization', `Bearer ${auditorToken}`);
        expect(me.status, 'the copied auditor token is accepted').to.equal(200);
      } finally {
        await replica.close();
      }
    });

    it('refuses a second copy into the same (now non-empty) schema, writing nothing', async () => {
      const before = await count(schema, 'audit_events');
      const err = await refusal(copyOf(source, schema));
      expect(err.reason).to.equal('target_not_empty');
      expect(err.message).to.include('never merges');
      expect(await count(schema, 'audit_events')).to.equal(before);
    });
  });

  it('refuses a source whose audit chain was tampered with, writing nothing', async () => {
    const file = await cloneSource('tampered');
    await sqliteExec(
      file,
      `DROP TRIGGER audit_events_no_update;
       UPDATE audit_events SET actor = 'someone-else' WHERE seq = 2;`,
    );
    const schema = schemaNamed('tampered');
    const err = await refusal(copyOf(file, schema));
    expect(err.reason).to.equal('source_chain_broken');
    expect(err.message).to.include('hash_mismatch at seq 2');
    expect(await count(schema, 'tenants')).to.equal(0);
  });

  it('refuses a missing source and a file that is not a control plane', async () => {
    const schema = schemaNamed('missing');
    const missing = await refusal(copyOf(path.join(dir, 'nope.sqlite'), schema));
    expect(missing.reason).to.equal('source_missing');
    const text = path.join(dir, 'text.sqlite');
    fs.writeFileSync(text, 'not a database at all, but long enough to be read as one '.repeat(20));
    expect((await refusal(copyOf(text, schema))).reason).to.equal('source_invalid');
    const other = path.join(dir, 'other.sqlite');
    await sqliteExec(other, 'CREATE TABLE notes (id TEXT)');
    const err = await refusal(copyOf(other, schema));
    expect(err.reason).to.equal('source_invalid');
    expect(err.message).to.include('not a cellcds control plane (no table tenants)');
    // A control plane of another version: a column would be lost, or is missing.
    const newer = await cloneSource('newer');
    await sqliteExec(newer, 'ALTER TABLE tenants ADD COLUMN colour TEXT');
    expect((await refusal(copyOf(newer, schema))).message).to.include(
      'has columns this version does not know (colour)',
    );
    const older = await cloneSource('older');
    await sqliteExec(older, 'ALTER TABLE tenants DROP COLUMN failover');
    expect((await refusal(copyOf(older, schema))).message).to.include('lacks failover');
    expect(await count(schema, 'tenants')).to.equal(0);
  });

  it('refuses (rolled back) when the source is written during the copy', async () => {
    const file = await cloneSource('busy');
    const schema = schemaNamed('busy');
    let writer: ControlPlane | undefined;
    const err = await refusal(
      copyControlPlane({
        from: file,
        postgresUrl: pgUrl,
        schema,
        onProgress: async (p) => {
          if (p.phase === 'copying' && !writer) {
            // A server still running: an admin write lands while the copy is under way.
            writer = await openControlPlane({ storage: file });
            await writer.audit.record({ type: 'spec.concurrent', outcome: 'success' });
          }
        },
      }),
    ).finally(() => writer?.close());
    expect(err.reason).to.equal('source_changed');
    for (const table of ['tenants', 'packs', 'admin_tokens', 'audit_events']) {
      expect(await count(schema, table), table).to.equal(0);
    }
  });

  describe('through the CLI', () => {
    const env = (extra: Record<string, string>) => ({
      ...process.env,
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_PUBLIC_URL: PUBLIC_URL,
      CELLCDS_LOG_LEVEL: 'silent',
      ...extra,
    });

    it('copies with CELLCDS_CONTROL_PLANE_URL and prints counts, the head and what to do next', async () => {
      const schema = schemaNamed('cli');
      const r = await runCliAsync(
        ['control-plane', 'copy'],
        env({ CELLCDS_CONTROL_PLANE_URL: pgUrl, CELLCDS_CONTROL_PLANE_SCHEMA: schema }),
      );
      expect(r.status, r.stderr).to.equal(0);
      expect(r.stdout).to.include(`into PostgreSQL schema ${schema}`);
      expect(r.stdout).to.match(/tenants\s+2\n/);
      expect(r.stdout).to.include(sourceHead.hash);
      expect(r.stdout).to.include('set CELLCDS_CONTROL_PLANE_URL');
      expect(r.stderr).to.include('control-plane copy: committed');
      expect(r.stdout + r.stderr).to.not.include(pgUrl);
      expect(await count(schema, 'tenants')).to.equal(2);
    });

    it('--to URL alone copies into CELLCDS_CONTROL_PLANE_SCHEMA (the schema the replicas will be given)', async () => {
      const schema = schemaNamed('to');
      const r = await runCliAsync(
        ['control-plane', 'copy', '--to', pgUrl, '--json'],
        env({ CELLCDS_CONTROL_PLANE_SCHEMA: schema }),
      );
      expect(r.status, r.stderr).to.equal(0);
      expect((JSON.parse(r.stdout) as { schema: string }).schema).to.equal(schema);
      expect(await count(schema, 'tenants')).to.equal(2);
    });

    it('refuses a non-empty target (exit 1), without printing the URL or its password', async () => {
      const schema = schemas.find((s) => s.endsWith('_cli')) ?? '';
      const secretUrl = new URL(pgUrl);
      secretUrl.password = 's3cret-pw';
      const r = await runCliAsync(
        ['control-plane', 'copy', '--to', secretUrl.toString(), '--schema', schema],
        env({}),
      );
      expect(r.status, r.stderr).to.equal(1);
      expect(r.stderr).to.include('already holds a control plane');
      expect(r.stdout + r.stderr).to.not.include('s3cret-pw');
    });

    it('refuses a missing source (exit 1) and no target (exit 2)', async () => {
      const missing = await runCliAsync(
        ['control-plane', 'copy', '--from', path.join(dir, 'nope.sqlite')],
        env({ CELLCDS_CONTROL_PLANE_URL: pgUrl, CELLCDS_CONTROL_PLANE_SCHEMA: schemaNamed('x') }),
      );
      expect(missing.status, missing.stderr).to.equal(1);
      expect(missing.stderr).to.include('no such file');
      const none = await runCliAsync(['control-plane', 'copy'], env({}));
      expect(none.status, none.stderr).to.equal(2);
      expect(none.stderr).to.include('CELLCDS_CONTROL_PLANE_URL');
    });
  });
});

/** The source's audit head, read straight from the file. */
function sqliteHead(file: string): Promise<{ seq: number; hash: string }> {
  return new Promise((resolve, reject) => {
    const db = new sqlite3.Database(file, sqlite3.OPEN_READONLY, (err) => {
      if (err) {
        reject(err);
        return;
      }
      db.all(
        'SELECT seq, hash FROM audit_head WHERE id = 1',
        (e: Error | null, rows: unknown[]) => {
          db.close(() => {
            if (e) {
              reject(e);
            } else {
              resolve(rows[0] as { seq: number; hash: string });
            }
          });
        },
      );
    });
  });
}
