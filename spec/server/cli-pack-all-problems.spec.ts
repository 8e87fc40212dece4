import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { parseDocument } from 'yaml';
import { BAD_FHIRPATH, brokenPack, MISSING_FILE, UNKNOWN_SERVICE } from '../helpers/broken-pack.ts';

/**
 * `pack validate` / `test` / `push` on a pack with a missing test file and other mistakes: one
 * run lists them all (real processes, real files).
 */
describe('cellcds CLI: every problem of a pack in one run', function () {
  this.timeout(120_000);
  let work: string;
  let file: string;

  const run = (args: string[]) =>
    new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = spawn(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
        env: {
          ...process.env,
          CELLCDS_DATA_DIR: path.join(work, 'data'),
          CELLCDS_LOG_LEVEL: 'silent',
        },
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      child.on('close', (status) => {
        resolve({ status, stdout, stderr });
      });
    });

  const expectAllThree = (stderr: string) => {
    expect(stderr).to.include(`${file}: 3 problem(s)`);
    for (const p of [MISSING_FILE(work), BAD_FHIRPATH, UNKNOWN_SERVICE]) {
      expect(stderr).to.include(`  ${p.path}: ${p.message}\n`);
    }
  };

  before(() => {
    work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-cli-all-problems-'));
    file = path.join(work, 'pack.json');
    fs.writeFileSync(file, JSON.stringify(brokenPack(), null, 2));
  });
  after(() => {
    fs.rmSync(work, { recursive: true, force: true });
  });

  for (const command of ['validate', 'test'] as const) {
    it(`pack ${command}: the missing file, the bad FHIRPath and the unknown service, exit 1`, async () => {
      const r = await run(['pack', command, file]);
      expect(r.status, r.stderr).to.equal(1);
      expectAllThree(r.stderr);
    });
  }

  it('pack validate: YAML syntax errors beyond the first 5 are counted, not printed as a problem', async () => {
    // A first key indented by mistake: the parser then reports every later token.
    const text = [
      '  id: my-pack',
      'version: 1.0.0',
      'services:',
      ...Array.from({ length: 50 }, (_, i) => `  - { id: s${i}, hook: order-sign }`),
      '',
    ].join('\n');
    const found = parseDocument(text, { uniqueKeys: true }).errors.length;
    expect(found).to.be.greaterThan(5);
    const yamlFile = path.join(work, 'indented.yaml');
    fs.writeFileSync(yamlFile, text);
    const r = await run(['pack', 'validate', yamlFile]);
    expect(r.status, r.stderr).to.equal(1);
    const lines = r.stderr.split('\n');
    expect(lines[0]).to.equal(`${yamlFile}: ${found} problem(s), first 5 shown`);
    const listed = lines.filter((l) => l.startsWith('  (document): '));
    expect(listed).to.have.length(5);
    expect(listed.every((l) => l.startsWith('  (document): YAML syntax error at line '))).to.equal(
      true,
    );
    expect(lines[6]).to.equal(
      `  ... and ${found - 5} more not shown (fix the first and check again: later ones often follow from it)`,
    );
  });

  it('pack push: lists them all and sends nothing (the files cannot be uploaded)', async () => {
    let requests = 0;
    const server = http.createServer((_req, res) => {
      requests++;
      res.writeHead(500).end();
    });
    server.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    try {
      const r = await run(['pack', 'push', file, '--url', url, '--token', 'x'.repeat(40)]);
      expect(r.status, r.stderr).to.equal(1);
      expectAllThree(r.stderr);
      expect(requests).to.equal(0);
    } finally {
      server.close();
    }
  });
});
