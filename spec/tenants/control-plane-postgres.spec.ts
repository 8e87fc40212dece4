/**
 * The control plane on the real PostgreSQL server (CELLCDS_TEST_PG_URL): the repositories'
 * behaviours, append-only audit triggers, and replicas (several control planes on one schema)
 * writing side by side and seeing each other's commits at once. Each test uses its own schema,
 * dropped afterwards.
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import { DatabaseError, QueryTypes, Sequelize } from 'sequelize';
import type { RulePack } from '../../rules/index.ts';
import { toServiceError } from '../../server/error-handler.ts';
import {
  ControlPlaneUnavailableError,
  openPostgresEngine,
} from '../../tenants/control-plane-postgres.ts';
import type { PostgresEngine } from '../../tenants/control-plane-postgres.ts';
import {
  ConflictError,
  InvalidInputError,
  isStoreUnavailableError,
  NotFoundError,
  openControlPlane,
} from '../../tenants/index.ts';
import type { ControlPlane, NewTenant } from '../../tenants/index.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { startTcpProxy } from './data-plane/tcp-proxy.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const RUN_ID = crypto.randomBytes(4).toString('hex');

async function rejection(promise: Promise<unknown>): Promise<Error> {
  try {
    await promise;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected a rejection');
}

function pack(id: string, version: string, title = 'A pack'): RulePack {
  return {
    id,
    version,
    title,
    publisher: 'spec',
    description: 'spec pack',
    services: [],
    rules: [],
  };
}

const hashOf = (p: RulePack) => crypto.createHash('sha256').update(JSON.stringify(p)).digest('hex');

/** `url` with every session's default isolation REPEATABLE READ (as ALTER ROLE ... SET could). */
function repeatableReadUrl(url: string): string {
  const u = new URL(url);
  u.searchParams.set('options', '-c default_transaction_isolation=repeatable\\ read');
  return u.toString();
}

describe('tenants/ isStoreUnavailableError: node-postgres on a dead connection', () => {
  it('reads "not queryable" (a restart between two statements) as unavailable: 503', () => {
    for (const message of [
      'Client has encountered a connection error and is not queryable',
      'Client was closed and is not queryable',
    ]) {
      const err = new DatabaseError(new Error(message) as never);
      expect(isStoreUnavailableError(err), message).to.equal(true);
      expect(toServiceError(err).status, message).to.equal(503);
    }
    const other = new DatabaseError(new Error('syntax error at or near "x"') as never);
    expect(isStoreUnavailableError(other)).to.equal(false);
  });
});

(PG_URL ? describe : describe.skip)('tenants/ control plane on PostgreSQL', function () {
  const url = PG_URL ?? '';
  let root: Sequelize;
  let schema: string;
  let n = 0;
  let issuer: TestIssuer;
  let clock: Date;
  const opened: ControlPlane[] = [];

  /** Opens a control plane on this test's schema (a replica); closed after the test. */
  async function open(extra: { maxIssuerCache?: number } = {}): Promise<ControlPlane> {
    const cp = await openControlPlane({ postgresUrl: url, schema, now: () => clock, ...extra });
    opened.push(cp);
    return cp;
  }

  const tenantInput = (id: string, overrides: Partial<NewTenant> = {}): NewTenant => ({
    id,
    name: `Tenant ${id}`,
    region: 'eu-west',
    issuers: [{ iss: `https://ehr-${id}.example.org`, jwks: issuer.publicJwks() }],
    fhirServers: ['https://fhir.example.org/r4'],
    ...overrides,
  });

  const sql = (text: string) => root.query(text, { type: QueryTypes.SELECT });

  before(async () => {
    issuer = await TestIssuer.create({ iss: 'https://ehr.example.org' });
    root = new Sequelize(url, { dialect: 'postgres', logging: false, pool: { max: 2 } });
  });
  after(async () => {
    await root.close();
  });
  beforeEach(() => {
    n += 1;
    schema = `cellcds_cp_${RUN_ID}_${String(n)}`;
    clock = new Date('2025-01-01T00:00:00Z');
  });
  afterEach(async () => {
    await Promise.all(opened.splice(0).map((cp) => cp.close()));
    await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  });

  describe('repositories', () => {
    let cp: ControlPlane;
    beforeEach(async () => {
      cp = await open();
    });

    it('creates, reads, lists (byte order), updates and removes tenants', async () => {
      const created = await cp.tenants.create(tenantInput('acme'));
      expect(created).to.deep.equal({
        id: 'acme',
        name: 'Tenant acme',
        region: 'eu-west',
        status: 'active',
        issuers: [{ iss: 'https://ehr-acme.example.org', jwks: issuer.publicJwks() }],
        fhirServers: ['https://fhir.example.org/r4'],
        subscriptions: [],
        createdAt: '2025-01-01T00:00:00.000Z',
        updatedAt: '2025-01-01T00:00:00.000Z',
      });
      expect(await cp.tenants.get('acme')).to.deep.equal(created);
      // As SQLite's BINARY collation: '-' (0x2d) sorts before letters whatever the server's.
      await cp.tenants.create(tenantInput('ab'));
      await cp.tenants.create(tenantInput('a-c'));
      expect((await cp.tenants.list()).map((t) => t.id)).to.deep.equal(['a-c', 'ab', 'acme']);
      const keys = await sql(
        `SELECT table_name || '.' || column_name AS name FROM information_schema.columns
         WHERE table_schema = '${schema}' AND collation_name = 'C' ORDER BY 1`,
      );
      expect(keys.map((k) => (k as { name: string }).name)).to.include.members([
        'tenants.id',
        'tenant_issuers.iss',
        'packs.id',
        'admin_tokens.id',
        'audit_events.at',
      ]);
      expect(await rejection(cp.tenants.create(tenantInput('acme')))).to.be.instanceOf(
        ConflictError,
      );
      clock = new Date('2025-02-01T00:00:00Z');
      const updated = await cp.tenants.update('acme', {
        status: 'suspended',
        issuers: [{ iss: 'https://new-ehr.example.org', jwks: issuer.publicJwks() }],
      });
      expect(updated.updatedAt).to.equal('2025-02-01T00:00:00.000Z');
      expect(await cp.tenants.get('acme')).to.deep.equal(updated);
      expect(await cp.tenants.findByIssuer('https://ehr-acme.example.org')).to.deep.equal([]);
      expect(
        (await cp.tenants.findByIssuer('https://new-ehr.example.org')).map((t) => t.status),
      ).to.deep.equal(['suspended']);
      await cp.tenants.remove('acme');
      expect(await rejection(cp.tenants.get('acme'))).to.be.instanceOf(NotFoundError);
      expect(await rejection(cp.tenants.remove('acme'))).to.be.instanceOf(NotFoundError);
      expect(await cp.tenants.findByIssuer('https://new-ehr.example.org')).to.deep.equal([]);
    });

    it('finds every tenant of an issuer, case-sensitively, and answers repeats from memory', async () => {
      const shared = { iss: 'https://shared-ehr.example.org', jwks: issuer.publicJwks() };
      await cp.tenants.create(tenantInput('acme', { issuers: [shared] }));
      await cp.tenants.create(tenantInput('beta', { issuers: [shared], sharedIssuer: true }));
      const found = await cp.tenants.findByIssuer(shared.iss);
      expect(found.map((t) => t.id)).to.deep.equal(['acme', 'beta']);
      expect((await cp.tenants.findByIssuer(shared.iss))[0]).to.equal(found[0]);
      expect(await cp.tenants.findByIssuer('https://SHARED-ehr.example.org')).to.deep.equal([]);
      expect(await rejection(cp.tenants.get('ACME'))).to.be.instanceOf(NotFoundError);
    });

    it('stores subscriptions to catalog versions only', async () => {
      await cp.tenants.create(tenantInput('acme'));
      const p = pack('med-safety', '1.0.0');
      await cp.packs.put({ id: p.id, version: p.version, hash: hashOf(p), pack: p });
      const subs = [{ pack: 'med-safety', version: '1.0.0' }];
      expect((await cp.tenants.setSubscriptions('acme', subs)).subscriptions).to.deep.equal(subs);
      const err = await rejection(
        cp.tenants.setSubscriptions('acme', [{ pack: 'med-safety', version: '2.0.0' }]),
      );
      expect(err).to.be.instanceOf(InvalidInputError);
      expect((await cp.tenants.get('acme')).subscriptions).to.deep.equal(subs);
    });

    it('keeps pack versions immutable and lists the catalog', async () => {
      const p = pack('med-safety', '1.0.0');
      const put = () =>
        cp.packs.put({ id: p.id, version: p.version, hash: hashOf(p), pack: p, uploadedBy: 'x' });
      expect(await put()).to.equal('created');
      expect(await put()).to.equal('unchanged');
      const changed = pack('med-safety', '1.0.0', 'Changed');
      expect(
        await rejection(
          cp.packs.put({ id: p.id, version: p.version, hash: hashOf(changed), pack: changed }),
        ),
      ).to.be.instanceOf(ConflictError);
      for (const v of ['1.10.0', '1.2.0']) {
        const q = pack('med-safety', v);
        await cp.packs.put({ id: q.id, version: v, hash: hashOf(q), pack: q });
      }
      expect(await cp.packs.versions('med-safety')).to.deep.equal(['1.0.0', '1.2.0', '1.10.0']);
      expect(await cp.packs.get('med-safety', '1.0.0')).to.deep.equal({
        id: 'med-safety',
        version: '1.0.0',
        hash: hashOf(p),
        pack: p,
        uploadedAt: '2025-01-01T00:00:00.000Z',
        uploadedBy: 'x',
      });
      expect(await cp.packs.list()).to.have.length(3);
      expect(await rejection(cp.packs.get('med-safety', '9.0.0'))).to.be.instanceOf(NotFoundError);
    });

    it('issues, authenticates, scopes and revokes admin tokens', async () => {
      const op = await cp.adminTokens.issue({ role: 'platform-operator', label: 'ops' });
      expect(await cp.adminTokens.authenticate(op.token)).to.deep.equal({
        tokenId: op.id,
        role: 'platform-operator',
      });
      const err = await rejection(cp.adminTokens.issue({ role: 'tenant-admin', tenant: 'nope' }));
      expect(err).to.be.instanceOf(InvalidInputError);
      await cp.tenants.create(tenantInput('acme'));
      const ta = await cp.adminTokens.issue({ role: 'tenant-admin', tenant: 'acme' });
      expect((await cp.adminTokens.authenticate(ta.token))?.tenant).to.equal('acme');
      expect((await cp.adminTokens.list()).map((t) => t.id)).to.have.members([op.id, ta.id]);
      await cp.adminTokens.revoke(op.id);
      expect(await cp.adminTokens.authenticate(op.token)).to.equal(undefined);
      await cp.tenants.remove('acme');
      expect(await cp.adminTokens.authenticate(ta.token)).to.equal(undefined);
      expect(await rejection(cp.adminTokens.revoke('tok_unknown'))).to.be.instanceOf(NotFoundError);
    });

    it('records, filters and verifies the audit chain; detects an edit', async () => {
      for (let i = 1; i <= 5; i++) {
        clock = new Date(Date.UTC(2025, 0, i));
        await cp.audit.record({
          type: 'admin.test',
          outcome: 'success',
          tenant: i % 2 ? 'acme' : 'beta',
          detail: { i },
        });
      }
      expect((await cp.audit.list()).map((e) => e.seq)).to.deep.equal([1, 2, 3, 4, 5]);
      expect((await cp.audit.list({ tenant: 'beta' })).map((e) => e.seq)).to.deep.equal([2, 4]);
      const range = await cp.audit.list({
        from: '2025-01-02T00:00:00Z',
        to: '2025-01-04T00:00:00Z',
      });
      expect(range.map((e) => e.seq)).to.deep.equal([2, 3]);
      expect(await cp.audit.verify()).to.deep.equal({ ok: true, count: 5 });
      // A superuser with the triggers out of the way: the chain still tells.
      await root.query(`ALTER TABLE "${schema}".audit_events DISABLE TRIGGER USER`);
      await root.query(`UPDATE "${schema}".audit_events SET actor = 'x' WHERE seq = 3`);
      expect((await cp.audit.verify()).ok).to.equal(false);
    });

    it('refuses UPDATE, DELETE and TRUNCATE of audit_events (append-only triggers)', async () => {
      await cp.audit.record({ type: 'admin.test', outcome: 'success' });
      for (const statement of [
        `UPDATE "${schema}".audit_events SET actor = 'x' WHERE seq = 1`,
        `DELETE FROM "${schema}".audit_events WHERE seq = 1`,
        `TRUNCATE "${schema}".audit_events`,
      ]) {
        const err = await rejection(root.query(statement));
        expect(err.message, statement).to.include('audit_events is append-only');
      }
      expect(await cp.audit.verify()).to.deep.equal({ ok: true, count: 1 });
    });

    it('answers ping with SELECT 1, and refuses calls after close', async () => {
      await cp.ping();
      await cp.close();
      opened.splice(opened.indexOf(cp), 1);
      expect(await rejection(cp.ping())).to.be.instanceOf(Error);
    });
  });

  describe('replicas on one schema', () => {
    it('see a suspension, a key set change, an issuer removal and a removal at once', async () => {
      const a = await open();
      const b = await open();
      await a.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      expect((await b.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['active']);
      expect(await b.tenants.activeFhirServers()).to.deep.equal(['https://fhir.example.org/r4']);
      await a.tenants.update('acme', { status: 'suspended' });
      expect((await b.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['suspended']);
      expect(await b.tenants.activeFhirServers()).to.deep.equal([]);
      await b.tenants.update('acme', { status: 'active' });
      expect((await a.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['active']);
      const rotated = await TestIssuer.create({ iss });
      await a.tenants.update('acme', { issuers: [{ iss, jwks: rotated.publicJwks() }] });
      expect((await b.tenants.findByIssuer(iss))[0]?.issuers[0]?.jwks).to.deep.equal(
        rotated.publicJwks(),
      );
      await a.tenants.update('acme', {
        issuers: [{ iss: 'https://moved.example.org', jwks: issuer.publicJwks() }],
      });
      expect(await b.tenants.findByIssuer(iss)).to.deep.equal([]);
      await a.tenants.remove('acme');
      expect(await b.tenants.findByIssuer('https://moved.example.org')).to.deep.equal([]);
    });

    it('sees a change made with psql too (the generation is kept by triggers)', async () => {
      const a = await open();
      await a.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      expect((await a.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['active']);
      await root.query(`UPDATE "${schema}".tenants SET status = 'suspended' WHERE id = 'acme'`);
      expect((await a.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['suspended']);
    });

    it('sees another replica’s suspension in every lookup started after it, under concurrency', async () => {
      const a = await open();
      const b = await open();
      await a.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      const before = Array.from({ length: 20 }, () => a.tenants.findByIssuer(iss));
      await b.tenants.update('acme', { status: 'suspended' });
      const after = Array.from({ length: 20 }, () => a.tenants.findByIssuer(iss));
      await Promise.all(before);
      for (const found of await Promise.all(after)) {
        expect(found.map((t) => t.status)).to.deep.equal(['suspended']);
      }
    });

    it('keep one audit chain when both append at once', async () => {
      const replicas = [await open(), await open(), await open()];
      const results = await Promise.allSettled(
        replicas.flatMap((cp, r) =>
          Array.from({ length: 20 }, (_, k) =>
            cp.audit.record({ type: 'x.y', outcome: 'success', detail: { r, k } }),
          ),
        ),
      );
      expect(results.filter((r) => r.status === 'rejected')).to.deep.equal([]);
      const events = await replicas[1]!.audit.list();
      expect(events.map((e) => e.seq)).to.deep.equal(events.map((_, k) => k + 1));
      expect(events).to.have.length(60);
      expect(await replicas[2]!.audit.verify()).to.deep.equal({ ok: true, count: 60 });
      const heads = await sql(`SELECT seq FROM "${schema}".audit_head`);
      expect(heads).to.deep.equal([{ seq: 60 }]);
    });

    it('create a tenant, a pack version and tokens once when both try at once', async () => {
      const [a, b] = [await open(), await open()];
      const created = await Promise.allSettled([
        a.tenants.create(tenantInput('acme')),
        b.tenants.create(tenantInput('acme', { name: 'Other' })),
      ]);
      expect(created.filter((r) => r.status === 'fulfilled')).to.have.length(1);
      const refused = created.find((r) => r.status === 'rejected');
      expect(refused?.reason).to.be.instanceOf(ConflictError);
      const p = pack('med-safety', '1.0.0');
      const q = pack('med-safety', '1.0.0', 'Other content');
      const puts = await Promise.allSettled([
        a.packs.put({ id: p.id, version: p.version, hash: hashOf(p), pack: p }),
        b.packs.put({ id: q.id, version: q.version, hash: hashOf(q), pack: q }),
      ]);
      expect(puts.filter((r) => r.status === 'fulfilled').map((r) => r.value)).to.deep.equal([
        'created',
      ]);
      expect(puts.find((r) => r.status === 'rejected')?.reason).to.be.instanceOf(ConflictError);
      // A token for a tenant removed at the same moment is refused or revoked with it.
      const [issued] = await Promise.allSettled([
        a.adminTokens.issue({ role: 'tenant-admin', tenant: 'acme' }),
        b.tenants.remove('acme'),
      ]);
      if (issued.status === 'fulfilled') {
        expect(await b.adminTokens.authenticate(issued.value.token)).to.equal(undefined);
      } else {
        expect(issued.reason).to.be.instanceOf(InvalidInputError);
      }
    });

    it('create the schema once when several open an empty one at once', async () => {
      const replicas = await Promise.all(Array.from({ length: 4 }, () => open()));
      const tables = await sql(
        `SELECT table_name AS name FROM information_schema.tables
         WHERE table_schema = '${schema}' ORDER BY table_name`,
      );
      expect(tables.map((t) => (t as { name: string }).name)).to.deep.equal([
        'admin_tokens',
        'audit_events',
        'audit_head',
        'control_generation',
        'packs',
        'retired_tenants',
        'tenant_issuers',
        'tenants',
      ]);
      await Promise.all(
        replicas.map((cp, i) =>
          cp.audit.record({ type: 'x.y', outcome: 'success', detail: { i } }),
        ),
      );
      expect(await replicas[0]!.audit.verify()).to.deep.equal({ ok: true, count: 4 });
    });
  });

  describe('failures', () => {
    const engines: PostgresEngine[] = [];
    afterEach(async () => {
      await Promise.all(engines.splice(0).map((e) => e.close().catch(() => undefined)));
    });

    it('a replica cut off mid-write loses the write lock within its idle timeout', async () => {
      const b = await open();
      await b.tenants.create(tenantInput('acme'));
      const proxy = await startTcpProxy(url);
      let release = (): void => undefined;
      try {
        const a = await openPostgresEngine({
          postgresUrl: proxy.url,
          schema,
          statementTimeoutMs: 1000,
          idleInTransactionTimeoutMs: 2000,
        });
        engines.push(a);
        // A takes the write lock, then its network goes silent (a host gone, a partition).
        let entered = (): void => undefined;
        const inside = new Promise<void>((resolve) => {
          entered = resolve;
        });
        const stuck = a
          .writeTx(async () => {
            entered();
            await new Promise<void>((resolve) => {
              release = resolve;
            });
          })
          .catch(() => undefined);
        await inside;
        proxy.stall();
        // B's writes (a suspension) wait for the lock; without the timeout they would fail on
        // statement_timeout until TCP keepalive ended A's session (about two hours).
        const started = Date.now();
        let suspended = false;
        while (!suspended && Date.now() - started < 9000) {
          suspended = await b.tenants.update('acme', { status: 'suspended' }).then(
            () => true,
            () => false,
          );
        }
        expect(suspended).to.equal(true);
        expect(Date.now() - started).to.be.below(6000);
        proxy.dropAll();
        proxy.resume();
        release();
        await stuck;
      } finally {
        release();
        await proxy.close();
      }
    });

    it('sets idle_in_transaction_session_timeout: twice the statement timeout, at least 10 s', async () => {
      for (const [statementTimeoutMs, expected] of [
        [5000, '10s'],
        [8000, '16s'],
      ] as const) {
        const e = await openPostgresEngine({ postgresUrl: url, schema, statementTimeoutMs });
        engines.push(e);
        const [row] = await e.sequelize.query<{ v: string }>('SELECT current_setting($1) AS v', {
          type: QueryTypes.SELECT,
          bind: ['idle_in_transaction_session_timeout'],
        });
        expect(row?.v, String(statementTimeoutMs)).to.equal(expected);
      }
    });

    it('writes under READ COMMITTED when the session default is REPEATABLE READ', async () => {
      const rr = repeatableReadUrl(url);
      const e = await openPostgresEngine({ postgresUrl: rr, schema });
      engines.push(e);
      const [dflt] = await e.sequelize.query<{ v: string }>(
        "SELECT current_setting('transaction_isolation') AS v",
        {
          type: QueryTypes.SELECT,
        },
      );
      expect(dflt?.v).to.equal('repeatable read');
      const inWrite = await e.writeTx(async (t) => {
        const [row] = await e.sequelize.query<{ v: string }>(
          "SELECT current_setting('transaction_isolation') AS v",
          {
            type: QueryTypes.SELECT,
            transaction: t,
          },
        );
        return row?.v;
      });
      expect(inWrite).to.equal('read committed');
      // Replicas appending at once: each append reads the head after the lock.
      const replicas = [
        await openControlPlane({ postgresUrl: rr, schema }),
        await openControlPlane({ postgresUrl: rr, schema }),
      ];
      opened.push(...replicas);
      const results = await Promise.allSettled(
        replicas.flatMap((cp, r) =>
          Array.from({ length: 10 }, (_, k) =>
            cp.audit.record({ type: 'x.y', outcome: 'success', detail: { r, k } }),
          ),
        ),
      );
      expect(results.filter((r) => r.status === 'rejected')).to.deep.equal([]);
      expect(await replicas[0]!.audit.verify()).to.deep.equal({ ok: true, count: 20 });
      // A tenant-admin token issued while another replica removes the tenant (both queued
      // behind a third session holding the lock): refused, or revoked with the tenant.
      const [a, b] = replicas as [ControlPlane, ControlPlane];
      await a.tenants.create(tenantInput('acme'));
      const { removing, issuing } = await root.transaction(async (t) => {
        await root.query('SELECT pg_advisory_xact_lock(hashtext(:k))', {
          replacements: { k: `cellcds.control.write.${schema}` },
          transaction: t,
        });
        const removing = a.tenants.remove('acme');
        await new Promise((resolve) => setTimeout(resolve, 300));
        const issuing = b.adminTokens.issue({ role: 'tenant-admin', tenant: 'acme' });
        await new Promise((resolve) => setTimeout(resolve, 300));
        return { removing, issuing };
      });
      await removing;
      const issued = await issuing.then(
        (v) => v,
        (err: unknown) => err,
      );
      expect(issued).to.be.instanceOf(InvalidInputError);
    });

    it('refuses lookups (503) while the generation row is missing, instead of caching forever', async () => {
      const a = await open();
      const b = await open();
      await a.tenants.create(tenantInput('acme'));
      const iss = 'https://ehr-acme.example.org';
      expect((await b.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['active']);
      await root.query(`DELETE FROM "${schema}".control_generation`);
      const err = await rejection(b.tenants.findByIssuer(iss));
      expect(err).to.be.instanceOf(ControlPlaneUnavailableError);
      expect(toServiceError(err).status).to.equal(503);
      await a.tenants.update('acme', { status: 'suspended' });
      expect(toServiceError(await rejection(b.tenants.activeFhirServers())).status).to.equal(503);
      // A replica starting recreates it; the others see the change made meanwhile.
      await open();
      expect((await b.tenants.findByIssuer(iss)).map((t) => t.status)).to.deep.equal(['suspended']);
    });

    it('answers 503 when PostgreSQL ends the session in the middle of a write', async () => {
      const e = await openPostgresEngine({ postgresUrl: url, schema });
      engines.push(e);
      const err = await rejection(
        e.writeTx(async (t) => {
          const [me] = await e.sequelize.query<{ pid: number }>('SELECT pg_backend_pid() AS pid', {
            type: QueryTypes.SELECT,
            transaction: t,
          });
          await root.query('SELECT pg_terminate_backend(:pid)', {
            replacements: { pid: me?.pid },
            type: QueryTypes.SELECT,
          });
          await new Promise((resolve) => setTimeout(resolve, 200));
          await e.sequelize.query('SELECT 1', { type: QueryTypes.SELECT, transaction: t });
        }),
      );
      expect(err.message).to.match(/not queryable|terminat/);
      expect(toServiceError(err).status, err.message).to.equal(503);
    });
  });

  describe('opening', () => {
    it('refuses a bad URL or schema without quoting the URL', async () => {
      for (const [opts, field] of [
        [{ postgresUrl: 'mysql://u:s3cret@db/x' }, 'postgresUrl'],
        [{ postgresUrl: 'not a url s3cret' }, 'postgresUrl'],
        [{ postgresUrl: url, schema: 'Bad-Schema' }, 'schema'],
        [{ postgresUrl: url, schema: 'x"; DROP SCHEMA public; --' }, 'schema'],
        [{ postgresUrl: url, storage: ':memory:' }, 'storage'],
      ] as const) {
        const err = await rejection(openControlPlane(opts as never));
        expect(err, field).to.be.instanceOf(InvalidInputError);
        expect(err instanceof InvalidInputError ? err.field : undefined).to.equal(field);
        expect(err.message).to.not.include('s3cret');
      }
    });

    it('fails within the acquire timeout when PostgreSQL does not answer', async () => {
      const started = Date.now();
      const err = await rejection(
        openControlPlane({
          postgresUrl: 'postgres://u:s3cret@127.0.0.1:1/test',
          schema,
          acquireTimeoutMs: 500,
        }),
      );
      expect(err.message).to.not.include('s3cret');
      expect(Date.now() - started).to.be.below(5000);
    });
  });
});
