/**
 * Boot failures an operator can act on (on-call review, finding E): `cellcds serve` that cannot
 * start logs one fatal JSON line naming the component and the setting to check, keeps the line
 * for humans on stderr and its exit code. Real processes, a real refused PostgreSQL port, a real
 * malformed keyring; the demo pack's problems through the same reporter.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { PackValidationError } from '../../rules/index.ts';
import { BootError, reportBootFailure } from '../../server/boot-failure.ts';
import { createLogger } from '../../server/logger.ts';
import { freePort, runCliAsync } from '../helpers/processes.ts';

/** The fatal JSON line of a run's stdout. */
function fatalLine(stdout: string): Record<string, unknown> {
  const line = stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .find((l) => l.level === 'fatal');
  expect(line, `a fatal JSON line in:\n${stdout}`).to.not.equal(undefined);
  return line!;
}

describe('server: a boot failure names the component and the setting to check', function () {
  this.timeout(120_000);
  let dir: string;
  let port: number;
  const env = (extra: Record<string, string>) => ({
    ...process.env,
    PORT: String(port),
    CELLCDS_DATA_DIR: path.join(dir, 'data'),
    CELLCDS_ADMIN_TOKEN: `op-${'b'.repeat(40)}`,
    CELLCDS_PUBLIC_URL: `http://127.0.0.1:${String(port)}`,
    CELLCDS_LOG_LEVEL: 'info',
    CELLCDS_SEED_DEMO: 'false',
    ...extra,
  });

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-boot-'));
    port = await freePort();
  });
  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("PostgreSQL refusing connections: the region's data plane and CELLCDS_REGIONS_FILE postgresUrl", async () => {
    const closed = await freePort(); // nothing listens there
    const regions = path.join(dir, 'regions.json');
    fs.writeFileSync(
      regions,
      JSON.stringify({
        regions: [
          {
            id: 'r1',
            jurisdiction: 'US',
            publicUrl: `http://127.0.0.1:${String(port)}`,
            storage: { postgresUrl: `postgres://cellcds:s3cret@127.0.0.1:${String(closed)}/db` },
            backupDir: path.join(dir, 'backups'),
            keyProvider: { kind: 'local-keyring', dir: path.join(dir, 'keys') },
          },
        ],
      }),
    );
    const r = await runCliAsync(
      ['serve'],
      env({ CELLCDS_REGIONS_FILE: regions, CELLCDS_REGION: 'r1' }),
    );
    expect(r.status, r.stderr).to.equal(1);
    const fatal = fatalLine(r.stdout);
    expect(fatal).to.include({
      msg: 'boot failed',
      component: 'region r1 data plane',
      setting: 'CELLCDS_REGIONS_FILE storage.postgresUrl',
    });
    expect(r.stderr).to.match(
      /cellcds: region r1 data plane failed at boot: .*\(check CELLCDS_REGIONS_FILE storage\.postgresUrl\)/,
    );
    expect(r.stdout + r.stderr).to.not.include('s3cret');
  });

  it('a malformed keyring: the key provider, its path and the setting', async () => {
    const keys = path.join(dir, 'data', 'keys');
    fs.mkdirSync(keys, { recursive: true, mode: 0o700 });
    fs.writeFileSync(path.join(keys, 'local.keyring.json'), '{ not json', { mode: 0o600 });
    const r = await runCliAsync(['serve'], env({}));
    expect(r.status, r.stderr).to.equal(1);
    const fatal = fatalLine(r.stdout);
    expect(fatal).to.include({
      component: `key provider (keyring ${keys})`,
      setting: 'CELLCDS_DATA_DIR (keys/)',
    });
    expect(r.stderr).to.include(`cellcds: key provider (keyring ${keys}) failed at boot:`);
    expect(r.stderr).to.include('malformed');
  });

  it('stores bound to another keyring (the keys folder lost or swapped): the key provider, before any key is made', async () => {
    // The region's stores were bound to a keyring this process does not have.
    const stores = path.join(dir, 'data', 'local');
    fs.mkdirSync(stores, { recursive: true, mode: 0o700 });
    const bound = `kr-${'0'.repeat(32)}`;
    fs.writeFileSync(
      path.join(stores, '.keyring-binding.json'),
      JSON.stringify({ keyringId: bound, boundAt: '2026-01-01T00:00:00.000Z' }),
      { mode: 0o600 },
    );
    const r = await runCliAsync(['serve'], env({}));
    expect(r.status, r.stderr).to.equal(1);
    const keys = path.join(dir, 'data', 'keys');
    expect(fatalLine(r.stdout)).to.include({
      component: `key provider (keyring ${keys})`,
      setting: 'CELLCDS_DATA_DIR (keys/)',
    });
    expect(r.stderr).to.include(`cellcds: key provider (keyring ${keys}) failed at boot:`);
    expect(r.stderr).to.include(`bound to keyring ${bound}`);
    expect(r.stderr).to.include('A replica refuses its keyring');
  });

  it('an invalid demo pack: its first 20 problems, in the log and on stderr', () => {
    const lines: string[] = [];
    const log = createLogger({
      level: 'info',
      destination: { write: (l: string) => void lines.push(l) },
    });
    const problems = Array.from({ length: 25 }, (_, i) => ({
      path: `rules[${String(i)}].when`,
      message: `unknown function 'f${String(i)}'`,
    }));
    const err = new BootError(
      'demo pack',
      'CELLCDS_SEED_DEMO (rules/packs/medication-safety)',
      new PackValidationError(problems),
    );
    let stderr = '';
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = (chunk: string | Uint8Array): boolean => {
      stderr += String(chunk);
      return true;
    };
    try {
      reportBootFailure(log, err);
    } finally {
      process.stderr.write = write;
    }
    const fatal = JSON.parse(lines[0]!) as { level: string; component: string; problems: string[] };
    expect(fatal).to.include({ level: 'fatal', component: 'demo pack' });
    expect(fatal.problems).to.have.length(21);
    expect(fatal.problems[0]).to.equal("rules[0].when: unknown function 'f0'");
    expect(fatal.problems[20]).to.equal('... and 5 more');
    expect(stderr).to.match(
      /^cellcds: demo pack failed at boot: rule pack is invalid: 25 problem\(s\)/,
    );
    expect(stderr).to.include("  - rules[19].when: unknown function 'f19'\n");
    expect(stderr).to.not.include("'f20'");
  });
});
