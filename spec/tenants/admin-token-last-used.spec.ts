/**
 * `lastUsedAt` of admin tokens in the control plane, with an injected clock, on SQLite and on
 * PostgreSQL: a successful authentication records its time, at most once per
 * ADMIN_TOKEN_USE_INTERVAL_MS per token (another replica reading the row included); a refused
 * token records nothing; the time never moves back (a later one written meanwhile by another
 * replica stays); a failing write never fails the authentication and is reported without the
 * token; control planes created before the column get it (null: never recorded); and
 * `control-plane copy` carries it from SQLite to PostgreSQL.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import { controlPlaneWritesDone } from '../helpers/control-plane-writes.ts';
import { sqliteExec } from '../helpers/sqlite-exec.ts';
import { copyControlPlane, hashAdminToken, openControlPlane } from '../../tenants/index.ts';
import type { ControlPlane } from '../../tenants/index.ts';
import {
  ADMIN_TOKEN_USE_INTERVAL_MS,
  createAdminTokenRepository,
} from '../../tenants/admin-token-repository.ts';
import type { AdminTokenInfoWithLifetime } from '../../tenants/admin-token-repository.ts';
import { defineControlPlaneModels } from '../../tenants/control-plane-models.ts';
import type { ControlPlaneModels, WriteTx } from '../../tenants/control-plane-models.ts';
import { openPostgresEngine } from '../../tenants/control-plane-postgres.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const RUN_ID = crypto.randomBytes(4).toString('hex');
const T0 = '2025-01-01T00:00:00.000Z';
const MINUTE_MS = 60 * 1000;
const plusMs = (iso: string, ms: number) => new Date(Date.parse(iso) + ms).toISOString();

const listOf = async (cp: ControlPlane) =>
  (await cp.adminTokens.list()) as AdminTokenInfoWithLifetime[];
/** A token's `lastUsedAt` as listed, once the writes started so far are done. */
const lastUsedOf = async (cp: ControlPlane, id: string): Promise<string | undefined> => {
  await controlPlaneWritesDone(cp);
  const row = (await listOf(cp)).find((t) => t.id === id);
  expect(row, id).to.not.equal(undefined);
  return row?.lastUsedAt;
};

/** A token as a control plane stores it (for rows written the old way). */
function storedToken(): { id: string; token: string; hash: string } {
  const token = `ccds_${crypto.randomBytes(32).toString('base64url')}`;
  return {
    id: `tok_${crypto.randomBytes(12).toString('hex')}`,
    token,
    hash: hashAdminToken(token),
  };
}

/** A backend's models and write transactions, without the control plane around them. */
interface Engine {
  models: ControlPlaneModels;
  writeTx: WriteTx;
  close(): Promise<void>;
}

describe('tenants/ admin token lastUsedAt', () => {
  let clock: string;
  const setClock = (iso: string) => {
    clock = iso;
  };
  const now = () => new Date(clock);
  beforeEach(() => {
    clock = T0;
  });

  it('writes at most once per 5 minutes per token', () => {
    expect(ADMIN_TOKEN_USE_INTERVAL_MS).to.equal(5 * MINUTE_MS);
  });

  /** Through openControlPlane; `open` opens one more control plane on the test's store. */
  function controlPlaneBehaviours(open: () => Promise<ControlPlane>) {
    it('records a successful authentication, then writes again only once the interval is over', async () => {
      const cp = await open();
      const tok = await cp.adminTokens.issue({ role: 'rule-author' });
      // Issued, never used: nothing recorded (listed without lastUsedAt).
      expect(await lastUsedOf(cp, tok.id)).to.equal(undefined);
      setClock(plusMs(T0, MINUTE_MS));
      expect(await cp.adminTokens.authenticate(tok.token)).to.deep.equal({
        tokenId: tok.id,
        role: 'rule-author',
      });
      const first = plusMs(T0, MINUTE_MS);
      expect(await lastUsedOf(cp, tok.id)).to.equal(first);
      // Used again inside the interval: no write, the row keeps the first use.
      for (const later of [1, 2 * MINUTE_MS, ADMIN_TOKEN_USE_INTERVAL_MS - 1]) {
        setClock(plusMs(first, later));
        expect(await cp.adminTokens.authenticate(tok.token)).to.not.equal(undefined);
        expect(await lastUsedOf(cp, tok.id), String(later)).to.equal(first);
      }
      // The interval over: written again.
      setClock(plusMs(first, ADMIN_TOKEN_USE_INTERVAL_MS));
      expect(await cp.adminTokens.authenticate(tok.token)).to.not.equal(undefined);
      expect(await lastUsedOf(cp, tok.id)).to.equal(plusMs(first, ADMIN_TOKEN_USE_INTERVAL_MS));
    });

    it('a replica that reads a use recorded inside the interval does not write again', async () => {
      const [a, b] = [await open(), await open()];
      const tok = await a.adminTokens.issue({ role: 'platform-operator' });
      expect(await a.adminTokens.authenticate(tok.token)).to.not.equal(undefined);
      expect(await lastUsedOf(a, tok.id)).to.equal(T0);
      setClock(plusMs(T0, 3 * MINUTE_MS));
      expect(await b.adminTokens.authenticate(tok.token)).to.not.equal(undefined);
      expect(await lastUsedOf(b, tok.id)).to.equal(T0);
      setClock(plusMs(T0, 6 * MINUTE_MS));
      expect(await b.adminTokens.authenticate(tok.token)).to.not.equal(undefined);
      // b wrote it; a reads it.
      await controlPlaneWritesDone(b);
      expect(await lastUsedOf(a, tok.id)).to.equal(plusMs(T0, 6 * MINUTE_MS));
    });

    it('a refused token (revoked, expired, unknown) records nothing', async () => {
      const cp = await open();
      const used = await cp.adminTokens.issue({ role: 'rule-author' });
      const revoked = await cp.adminTokens.issue({ role: 'rule-author' });
      const expiring = await cp.adminTokens.issue({ role: 'rule-author', expiresInDays: 1 });
      expect(await cp.adminTokens.authenticate(used.token)).to.not.equal(undefined);
      await cp.adminTokens.revoke(revoked.id);
      await cp.adminTokens.revoke(used.id);
      setClock(plusMs(T0, 2 * 24 * 60 * MINUTE_MS));
      for (const tok of [used, revoked, expiring]) {
        expect(await cp.adminTokens.check(tok.token), tok.id).to.have.property('refused');
      }
      expect(await cp.adminTokens.authenticate(storedToken().token)).to.equal(undefined);
      expect(await lastUsedOf(cp, used.id)).to.equal(T0);
      expect(await lastUsedOf(cp, revoked.id)).to.equal(undefined);
      expect(await lastUsedOf(cp, expiring.id)).to.equal(undefined);
    });
  }

  /** Straight on the repository, over a backend's models, with a write transaction to steer. */
  function repositoryBehaviours(openEngine: () => Promise<Engine>) {
    let engine: Engine;
    beforeEach(async () => {
      engine = await openEngine();
    });
    afterEach(async () => engine.close());
    const rowOf = async (id: string) =>
      (await engine.models.AdminToken.findByPk(id, { raw: true })) as unknown as {
        lastUsedAt: string | null;
      };

    it('never moves lastUsedAt back: a later use written meanwhile by another replica stays', async () => {
      let before: (() => Promise<void>) | undefined;
      const repo = createAdminTokenRepository({
        models: engine.models,
        now,
        // Another replica (its clock ahead) commits between this one's read and its write.
        writeTx: async (fn) => {
          await before?.();
          return engine.writeTx(fn);
        },
        tenantExists: () => Promise.resolve(true),
      });
      const tok = await repo.issue({ role: 'rule-author' });
      const later = plusMs(T0, 20 * MINUTE_MS);
      before = async () => {
        await engine.models.AdminToken.update({ lastUsedAt: later }, { where: { id: tok.id } });
      };
      setClock(plusMs(T0, 10 * MINUTE_MS));
      expect(await repo.authenticate(tok.token)).to.not.equal(undefined);
      await repo.settled();
      expect((await rowOf(tok.id)).lastUsedAt).to.equal(later);
      // And a use after both is written.
      before = undefined;
      setClock(plusMs(T0, 30 * MINUTE_MS));
      await repo.authenticate(tok.token);
      await repo.settled();
      expect((await rowOf(tok.id)).lastUsedAt).to.equal(plusMs(T0, 30 * MINUTE_MS));
    });

    it('counts one write per interval however busy the token is', async () => {
      let writes = 0;
      const repo = createAdminTokenRepository({
        models: engine.models,
        now,
        writeTx: (fn) => {
          writes += 1;
          return engine.writeTx(fn);
        },
        tenantExists: () => Promise.resolve(true),
      });
      const tok = await repo.issue({ role: 'rule-author' });
      writes = 0;
      // A burst of concurrent requests, then one a second for four minutes.
      await Promise.all(Array.from({ length: 20 }, () => repo.authenticate(tok.token)));
      for (let s = 1; s < 240; s += 1) {
        setClock(plusMs(T0, s * 1000));
        await repo.authenticate(tok.token);
      }
      await repo.settled();
      expect(writes).to.equal(1);
      expect((await rowOf(tok.id)).lastUsedAt).to.equal(T0);
    });

    it('a failing write fails no authentication: reported without the token, retried after the interval', async () => {
      let failing = false;
      const reported: Array<{ tokenId: string; err: unknown }> = [];
      const repo = createAdminTokenRepository({
        models: engine.models,
        now,
        writeTx: (fn) =>
          failing
            ? Promise.reject(new Error('SQLITE_FULL: database or disk is full'))
            : engine.writeTx(fn),
        tenantExists: () => Promise.resolve(true),
        onUseNotRecorded: (tokenId, err) => {
          reported.push({ tokenId, err });
        },
      });
      const tok = await repo.issue({ role: 'platform-operator' });
      failing = true;
      expect(await repo.check(tok.token)).to.deep.equal({
        principal: { tokenId: tok.id, role: 'platform-operator' },
      });
      await repo.settled();
      expect(reported).to.have.length(1);
      expect(reported[0]?.tokenId).to.equal(tok.id);
      expect(String(reported[0]?.err)).to.include('SQLITE_FULL');
      expect(String(reported[0]?.err)).to.not.include(tok.token);
      expect((await rowOf(tok.id)).lastUsedAt).to.equal(null);
      // Not retried on every request (no write, no warning per request) ...
      setClock(plusMs(T0, MINUTE_MS));
      expect(await repo.authenticate(tok.token)).to.not.equal(undefined);
      await repo.settled();
      expect(reported).to.have.length(1);
      // ... but once the interval is over.
      failing = false;
      setClock(plusMs(T0, ADMIN_TOKEN_USE_INTERVAL_MS));
      expect(await repo.authenticate(tok.token)).to.not.equal(undefined);
      await repo.settled();
      expect((await rowOf(tok.id)).lastUsedAt).to.equal(plusMs(T0, ADMIN_TOKEN_USE_INTERVAL_MS));
    });

    it('a report that throws is contained (no unhandled rejection)', async () => {
      let failing = false;
      const repo = createAdminTokenRepository({
        models: engine.models,
        now,
        writeTx: (fn) => (failing ? Promise.reject(new Error('down')) : engine.writeTx(fn)),
        tenantExists: () => Promise.resolve(true),
        onUseNotRecorded: () => {
          throw new Error('logger down');
        },
      });
      const unhandled: unknown[] = [];
      const onUnhandled = (reason: unknown) => unhandled.push(reason);
      process.on('unhandledRejection', onUnhandled);
      try {
        const tok = await repo.issue({ role: 'rule-author' });
        failing = true;
        expect(await repo.authenticate(tok.token)).to.not.equal(undefined);
        await repo.settled();
        await new Promise((resolve) => setImmediate(resolve));
      } finally {
        process.off('unhandledRejection', onUnhandled);
      }
      expect(unhandled).to.deep.equal([]);
    });
  }

  describe('on SQLite', () => {
    let dir: string;
    let file: string;
    const opened: ControlPlane[] = [];
    const open = async () => {
      const cp = await openControlPlane({ storage: file, now });
      opened.push(cp);
      return cp;
    };
    beforeEach(() => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-tokused-'));
      file = path.join(dir, 'control.sqlite');
    });
    afterEach(async () => {
      await Promise.all(opened.map(controlPlaneWritesDone));
      await Promise.all(opened.splice(0).map((cp) => cp.close()));
      fs.rmSync(dir, { recursive: true, force: true });
    });

    controlPlaneBehaviours(open);

    describe('the repository', () => {
      repositoryBehaviours(async () => {
        const sequelize = new Sequelize({ dialect: 'sqlite', storage: file, logging: false });
        const models = defineControlPlaneModels(sequelize);
        await sequelize.sync();
        return {
          models,
          writeTx: (fn) => sequelize.transaction((t) => fn(t)),
          close: () => sequelize.close(),
        };
      });
    });

    it('opens a control plane whose admin_tokens predates lastUsedAt: the column is added, old rows list none', async () => {
      const old = storedToken();
      await sqliteExec(file, [
        // The table as control planes with issuers and expiries, before lastUsedAt, made it.
        'CREATE TABLE IF NOT EXISTS `admin_tokens` (`id` VARCHAR(64) PRIMARY KEY, `role` VARCHAR(32) NOT NULL, `tenant_id` VARCHAR(63), `label` VARCHAR(200), `token_hash` VARCHAR(64) NOT NULL UNIQUE, `created_at` VARCHAR(32) NOT NULL, `revoked_at` VARCHAR(32), `issued_by` VARCHAR(64), `expires_at` VARCHAR(32))',
        `INSERT INTO admin_tokens (id, role, tenant_id, label, token_hash, created_at, revoked_at, issued_by, expires_at) VALUES ('${old.id}', 'platform-operator', NULL, 'old', '${old.hash}', '2024-12-01T00:00:00.000Z', NULL, NULL, '2025-03-01T00:00:00.000Z')`,
      ]);
      const cp = await open();
      // Never recorded: listed without lastUsedAt, as a token never used since.
      expect((await listOf(cp)).find((t) => t.id === old.id)).to.deep.equal({
        id: old.id,
        role: 'platform-operator',
        label: 'old',
        createdAt: '2024-12-01T00:00:00.000Z',
        expiresAt: '2025-03-01T00:00:00.000Z',
      });
      expect(await cp.adminTokens.authenticate(old.token)).to.not.equal(undefined);
      expect(await lastUsedOf(cp, old.id)).to.equal(T0);
      await cp.close();
      opened.splice(0);
      // Opened again: nothing more added, the use kept.
      const again = await open();
      expect(await lastUsedOf(again, old.id)).to.equal(T0);
    });

    it('two processes opening an older file at once both open it: each missing column is added once (tenants and admin_tokens alike)', async () => {
      await (await open()).close();
      opened.splice(0);
      // An older control plane: before tenants' retention and admin tokens' last use.
      await sqliteExec(file, [
        'ALTER TABLE tenants DROP COLUMN retention',
        'ALTER TABLE admin_tokens DROP COLUMN last_used_at',
      ]);
      for (let round = 0; round < 3; round += 1) {
        const both = await Promise.allSettled([open(), open()]);
        expect(both.map((r) => (r.status === 'rejected' ? String(r.reason) : 'ok'))).to.deep.equal([
          'ok',
          'ok',
        ]);
        await Promise.all(opened.splice(0).map((cp) => cp.close()));
        if (round < 2) {
          await sqliteExec(file, [
            'ALTER TABLE tenants DROP COLUMN retention',
            'ALTER TABLE admin_tokens DROP COLUMN last_used_at',
          ]);
        }
      }
      const cp = await open();
      expect((await cp.tenants.list()).length).to.equal(0);
      expect(await listOf(cp)).to.deep.equal([]);
    });
  });

  (PG_URL ? describe : describe.skip)('on PostgreSQL', function () {
    this.timeout(120_000);
    const url = PG_URL ?? '';
    let root: Sequelize;
    let schema: string;
    let n = 0;
    const opened: ControlPlane[] = [];
    const open = async () => {
      const cp = await openControlPlane({ postgresUrl: url, schema, now });
      opened.push(cp);
      return cp;
    };
    before(() => {
      root = new Sequelize(url, { dialect: 'postgres', logging: false, pool: { max: 2 } });
    });
    after(async () => root.close());
    beforeEach(() => {
      n += 1;
      schema = `tokused_${RUN_ID}_${String(n)}`;
    });
    afterEach(async () => {
      await Promise.all(opened.map(controlPlaneWritesDone));
      await Promise.all(opened.splice(0).map((cp) => cp.close()));
      await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
    });

    controlPlaneBehaviours(open);

    describe('the repository', () => {
      repositoryBehaviours(async () => {
        const engine = await openPostgresEngine({ postgresUrl: url, schema });
        return { models: engine.models, writeTx: engine.writeTx, close: engine.close };
      });
    });

    it('opens a schema whose admin_tokens predates lastUsedAt: the column is added (collation C), old rows list none', async () => {
      const old = storedToken();
      await root.query(`CREATE SCHEMA "${schema}"`);
      await root.query(
        `CREATE TABLE "${schema}".admin_tokens (id VARCHAR(64) COLLATE "C" PRIMARY KEY, role VARCHAR(32) NOT NULL, tenant_id VARCHAR(63) COLLATE "C", label VARCHAR(200), token_hash VARCHAR(64) NOT NULL UNIQUE, created_at VARCHAR(32) COLLATE "C" NOT NULL, revoked_at VARCHAR(32), issued_by VARCHAR(64) COLLATE "C", expires_at VARCHAR(32) COLLATE "C")`,
      );
      await root.query(
        `INSERT INTO "${schema}".admin_tokens (id, role, tenant_id, label, token_hash, created_at, revoked_at, issued_by, expires_at) VALUES ('${old.id}', 'platform-operator', NULL, 'old', '${old.hash}', '2024-12-01T00:00:00.000Z', NULL, NULL, NULL)`,
      );
      // Two replicas opening the old schema at once: one adds the column, both work.
      const [a, b] = await Promise.all([open(), open()]);
      const cols = await root.query<{ column_name: string; collation_name: string | null }>(
        `SELECT column_name, collation_name FROM information_schema.columns WHERE table_schema = '${schema}' AND table_name = 'admin_tokens' AND column_name = 'last_used_at'`,
        { type: QueryTypes.SELECT },
      );
      expect(cols).to.deep.equal([{ column_name: 'last_used_at', collation_name: 'C' }]);
      expect((await listOf(b)).find((t) => t.id === old.id)).to.not.have.property('lastUsedAt');
      expect(await a.adminTokens.authenticate(old.token)).to.not.equal(undefined);
      expect(await lastUsedOf(a, old.id)).to.equal(T0);
      expect(await lastUsedOf(b, old.id)).to.equal(T0);
    });

    it('control-plane copy carries lastUsedAt from SQLite, and the interval still holds', async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-tokused-copy-'));
      try {
        const file = path.join(dir, 'control.sqlite');
        const src = await openControlPlane({ storage: file, now });
        const used = await src.adminTokens.issue({ role: 'platform-operator' });
        const idle = await src.adminTokens.issue({ role: 'rule-author' });
        setClock(plusMs(T0, 2 * MINUTE_MS));
        await src.adminTokens.authenticate(used.token);
        expect(await lastUsedOf(src, used.id)).to.equal(plusMs(T0, 2 * MINUTE_MS));
        const before = await listOf(src);
        await src.close();

        await copyControlPlane({ from: file, postgresUrl: url, schema });
        const cp = await open();
        expect(await listOf(cp)).to.deep.equal(before);
        expect(before.find((t) => t.id === idle.id)).to.not.have.property('lastUsedAt');
        setClock(plusMs(T0, 4 * MINUTE_MS));
        await cp.adminTokens.authenticate(used.token);
        expect(await lastUsedOf(cp, used.id)).to.equal(plusMs(T0, 2 * MINUTE_MS));
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  });
});
