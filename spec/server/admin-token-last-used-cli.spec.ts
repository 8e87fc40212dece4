/**
 * `cellcds token list` shows each token's `lastUsedAt` (absent: no use recorded), and
 * `--unused-for-days N` lists only the stale live tokens (real processes on a local data
 * directory; the uses are made in this process on the same control plane, with its clock set
 * back 40 days for the old ones).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { controlPlaneWritesDone } from '../helpers/control-plane-writes.ts';
import { runCli } from '../helpers/processes.ts';
import { openControlPlane } from '../../tenants/index.ts';

const DAY_MS = 24 * 60 * 60 * 1000;

interface Listed {
  id: string;
  label?: string;
  lastUsedAt?: string;
}

describe('cellcds token list: last use', function () {
  this.timeout(180_000);
  let dataDir: string;
  const run = (args: string[]) =>
    runCli(args, {
      ...process.env,
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_LOG_LEVEL: 'silent',
      CELLCDS_SEED_DEMO: 'false',
    });
  const listOf = (args: string[] = []): Listed[] => {
    const r = run(['token', 'list', ...args]);
    expect(r.status, r.stderr).to.equal(0);
    return JSON.parse(r.stdout) as Listed[];
  };

  before(() => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-tokused-cli-'));
  });
  after(() => {
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it('lists lastUsedAt, and --unused-for-days the live tokens neither used nor issued since', async () => {
    // The CLI makes the data directory; the tokens and their uses are this process's, on its
    // control plane.
    expect(listOf()).to.deep.equal([]);
    const realNow = Date.now();
    let clock = realNow - 40 * DAY_MS;
    const oldUse = new Date(clock).toISOString();
    const cp = await openControlPlane({
      storage: path.join(dataDir, 'control.sqlite'),
      now: () => new Date(clock),
    });
    const stale = await cp.adminTokens.issue({ role: 'platform-operator', label: 'stale' });
    const idle = await cp.adminTokens.issue({ role: 'rule-author', label: 'idle' });
    const used = await cp.adminTokens.issue({ role: 'rule-author', label: 'used' });
    const revoked = await cp.adminTokens.issue({ role: 'rule-author', label: 'revoked' });
    try {
      expect(await cp.adminTokens.authenticate(stale.token)).to.not.equal(undefined);
      await controlPlaneWritesDone(cp);
      clock = realNow;
      expect(await cp.adminTokens.authenticate(used.token)).to.not.equal(undefined);
      await cp.adminTokens.revoke(revoked.id);
      await controlPlaneWritesDone(cp);
    } finally {
      await cp.close();
    }

    const byId = new Map(listOf().map((t) => [t.id, t]));
    expect([...byId.keys()]).to.have.members([stale.id, idle.id, used.id, revoked.id]);
    expect(byId.get(stale.id)?.lastUsedAt).to.equal(oldUse);
    expect(byId.get(used.id)?.lastUsedAt).to.equal(new Date(realNow).toISOString());
    expect(byId.get(idle.id)).to.not.have.property('lastUsedAt');

    const staleIds = listOf(['--unused-for-days', '30']).map((t) => t.id);
    expect(staleIds).to.have.members([stale.id, idle.id]);
    expect(listOf(['--unused-for-days', '45'])).to.deep.equal([]);
    const bad = run(['token', 'list', '--unused-for-days', 'soon']);
    expect(bad.status).to.equal(2);
    expect(bad.stderr).to.include('unusedForDays');
  });
});
