/**
 * The control-plane audit chain's head and links (`head`, `hashAt`) on both dialects, and the
 * rewrite a database superuser can make (delete an event, renumber, recompute every hash, move
 * the head): `verify` alone passes it (the documented limit), a kept anchor does not.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import { controlPlaneChain, withKeptAnchors } from '../../server/audit-anchors.ts';
import { chainHash, GENESIS_HASH, openControlPlane } from '../../tenants/index.ts';
import type { ControlPlane } from '../../tenants/index.ts';
import { controlPlaneEvent, rewriteChain } from '../helpers/audit-rewrite.ts';
import type { EventRow } from '../helpers/audit-rewrite.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const RUN_ID = crypto.randomBytes(4).toString('hex');

interface Dialect {
  name: string;
  open(): Promise<ControlPlane>;
  /** Deletes the event at `seq`, renumbers and rehashes the rest, moves the head. */
  rewrite(seq: number): Promise<void>;
  cleanup(): Promise<void>;
}

function sqlite(): Dialect {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cpanchor-'));
  const file = path.join(dir, 'control.sqlite');
  return {
    name: 'SQLite',
    open: () => openControlPlane({ storage: file }),
    rewrite: (seq) =>
      rewriteChain(file, seq, 'at, type, outcome, tenant, actor, detail', controlPlaneEvent),
    cleanup: () => {
      fs.rmSync(dir, { recursive: true, force: true });
      return Promise.resolve();
    },
  };
}

function postgres(url: string): Dialect {
  const schema = `cellcds_anchor_${RUN_ID}`;
  const root = new Sequelize(url, { dialect: 'postgres', logging: false, pool: { max: 1 } });
  const table = `"${schema}".audit_events`;
  return {
    name: 'PostgreSQL',
    open: () => openControlPlane({ postgresUrl: url, schema }),
    async rewrite(drop) {
      const rows = await root.query<EventRow>(
        `SELECT seq, at, type, outcome, tenant, actor, detail FROM ${table} ORDER BY seq`,
        { type: QueryTypes.SELECT },
      );
      await root.transaction(async (transaction) => {
        await root.query(`ALTER TABLE ${table} DISABLE TRIGGER USER`, { transaction });
        await root.query(`DELETE FROM ${table}`, { transaction });
        let prev = GENESIS_HASH;
        let seq = 0;
        for (const row of rows.filter((r) => r.seq !== drop)) {
          seq += 1;
          const hash = chainHash(prev, seq, controlPlaneEvent(row));
          await root.query(
            `INSERT INTO ${table} (seq, at, type, outcome, tenant, actor, detail, prev_hash, hash)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
            {
              replacements: [
                seq,
                row.at,
                row.type,
                row.outcome,
                row.tenant ?? null,
                row.actor,
                row.detail,
                prev,
                hash,
              ],
              transaction,
            },
          );
          prev = hash;
        }
        await root.query(`UPDATE "${schema}".audit_head SET seq = ?, hash = ? WHERE id = 1`, {
          replacements: [seq, prev],
          transaction,
        });
        await root.query(`ALTER TABLE ${table} ENABLE TRIGGER USER`, { transaction });
      });
    },
    async cleanup() {
      await root.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
      await root.close();
    },
  };
}

const dialects: Array<[string, () => Dialect]> = [['SQLite', sqlite]];
if (PG_URL) {
  dialects.push(['PostgreSQL', () => postgres(PG_URL)]);
}

for (const [name, make] of dialects) {
  describe(`tenants/ control-plane audit chain anchors (${name})`, function () {
    this.timeout(60_000);
    let dialect: Dialect;
    let cp: ControlPlane;

    beforeEach(async () => {
      dialect = make();
      cp = await dialect.open();
      for (let i = 1; i <= 6; i++) {
        await cp.audit.record({ type: 'records.read', outcome: 'success', actor: `op-${i}` });
      }
    });
    afterEach(async () => {
      await cp.close();
      await dialect.cleanup();
    });

    it('gives its head and the hash of each seq (none for 0 or past the head)', async () => {
      const chain = controlPlaneChain(cp.audit);
      const head = await chain.head();
      expect(head.seq).to.equal(6);
      expect(await chain.hashAt(6)).to.equal(head.hash);
      expect(await chain.hashAt(3)).to.match(/^[0-9a-f]{64}$/);
      expect(await chain.hashAt(0)).to.equal(undefined);
      expect(await chain.hashAt(7)).to.equal(undefined);
    });

    it('a rewrite passes verify alone, not an anchor taken before it', async () => {
      const chain = controlPlaneChain(cp.audit);
      const anchor = await chain.head();
      const genesis = { seq: 0, hash: GENESIS_HASH };
      expect(
        await withKeptAnchors(await chain.verify(), [genesis, anchor], chain.hashAt),
      ).to.deep.equal({
        ok: true,
        count: 6,
        anchors: [
          { ...genesis, held: true },
          { ...anchor, held: true },
        ],
      });
      await dialect.rewrite(2);
      expect(await chain.verify()).to.deep.equal({ ok: true, count: 5 });
      expect(await withKeptAnchors(await chain.verify(), [anchor], chain.hashAt)).to.deep.equal({
        ok: false,
        count: 5,
        firstBadSeq: 6,
        problem: 'anchor_not_held',
        anchors: [{ ...anchor, held: false }],
      });
    });
  });
}
