import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { buildDeps } from '../../server/bootstrap.ts';
import { loadConfig } from '../../server/config.ts';
import { createLogger } from '../../server/logger.ts';
import { openControlPlane } from '../../tenants/index.ts';

const modeOf = (file: string): string => (fs.statSync(file).mode & 0o777).toString(8);

/**
 * The control plane holds admin token hashes, the audit trail and the tenants' configuration:
 * its SQLite file, and the -wal and -shm files SQLite makes with the main file's mode, are
 * 0600 like the tenant stores and the keyring; the data directory cellcds makes is 0700.
 */
describe('control-plane file modes', function () {
  this.timeout(60_000);
  let root: string;
  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-mode-'));
  });
  afterEach(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  const writeOnce = async (file: string) => {
    const cp = await openControlPlane({ storage: file });
    try {
      await cp.audit.record({ type: 'test.event', outcome: 'success' });
      // The WAL and its index exist while the database is open.
      for (const f of [file, `${file}-wal`, `${file}-shm`]) {
        expect(modeOf(f), f).to.equal('600');
      }
    } finally {
      await cp.close();
    }
  };

  it('creates control.sqlite, its -wal and its -shm 0600 (not the umask default 0644)', async () => {
    await writeOnce(path.join(root, 'control.sqlite'));
  });

  it('tightens an existing control.sqlite (and its -wal/-shm) that group or others may read to 0600', async () => {
    const file = path.join(root, 'control.sqlite');
    const cp = await openControlPlane({ storage: file });
    await cp.audit.record({ type: 'test.event', outcome: 'success' });
    await cp.close();
    fs.chmodSync(file, 0o644);
    for (const f of [`${file}-wal`, `${file}-shm`]) {
      if (fs.existsSync(f)) {
        fs.chmodSync(f, 0o644);
      }
    }
    // A -wal left behind by a crash, readable by others.
    fs.writeFileSync(`${file}-wal`, '', { mode: 0o644 });
    fs.chmodSync(`${file}-wal`, 0o644);
    await writeOnce(file);
    const again = await openControlPlane({ storage: file });
    expect((await again.audit.list({ type: 'test.event' })).length).to.equal(2);
    await again.close();
  });

  it('through the server: a data directory cellcds makes is 0700, control.sqlite and its WAL files 0600', async () => {
    const dataDir = path.join(root, 'made', 'data');
    const config = loadConfig({
      CELLCDS_DATA_DIR: dataDir,
      CELLCDS_PUBLIC_URL: 'https://cds.test.example',
      CELLCDS_ADMIN_TOKEN: `test-operator-${'a'.repeat(40)}`,
    });
    const deps = await buildDeps(
      config,
      createLogger({ level: 'error', destination: { write: () => undefined } }),
    );
    try {
      await deps.controlPlane.audit.record({ type: 'test.event', outcome: 'success' });
      expect(modeOf(dataDir)).to.equal('700');
      for (const f of ['control.sqlite', 'control.sqlite-wal', 'control.sqlite-shm']) {
        expect(modeOf(path.join(dataDir, f)), f).to.equal('600');
      }
    } finally {
      await deps.close();
    }
  });

  it('leaves the mode of a data directory the operator made alone', async () => {
    const dataDir = path.join(root, 'operator-made');
    fs.mkdirSync(dataDir);
    fs.chmodSync(dataDir, 0o750);
    await writeOnce(path.join(dataDir, 'control.sqlite'));
    expect(modeOf(dataDir)).to.equal('750');
  });

  it('an in-memory control plane has no file to protect', async () => {
    const cp = await openControlPlane({ storage: ':memory:' });
    await cp.audit.record({ type: 'test.event', outcome: 'success' });
    await cp.close();
    expect(fs.existsSync(':memory:')).to.equal(false);
  });
});
