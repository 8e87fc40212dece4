/**
 * The bench (`npm run bench`) runs: its smoke mode (tiny durations, 2 patients, a handful of
 * tenants) goes through every section and prints one JSON line. Not a timed test: no figure is
 * checked against a target, only that each section produced its figures.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

function runBench(
  args: string[],
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'bench/run.ts', ...args], {
      cwd: ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString('utf8')));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    child.once('error', reject);
    child.once('exit', (code) => {
      resolve({ code, stdout, stderr });
    });
  });
}

describe('bench: npm run bench -- --smoke', function () {
  this.timeout(300_000);

  it('runs every section and prints one JSON line with their figures', async () => {
    const { code, stdout, stderr } = await runBench(['--smoke']);
    expect(code, stderr.slice(-2000)).to.equal(0);
    const lines = stdout.trim().split('\n');
    const last = lines[lines.length - 1] ?? '';
    // eslint-disable-next-line @typescript-eslint/no-explicit-any -- a JSON report, read field by field
    const report = JSON.parse(last) as Record<string, any>;
    expect(report.bench).to.equal('cellcds');
    expect(report.mode).to.equal('smoke');
    expect(report.ratios.engineVsFhirpath).to.be.a('number');
    expect(report.ratios.e2eThroughputES384).to.be.a('number');
    expect(report.ratios.tenantSpread).to.be.a('number');
    expect(report.engine.calls).to.equal(4);
    expect(report.e2e.algs.ES384.cellcds.rps).to.be.greaterThan(0);
    // A-B-A: the baseline runs again after cellcds, the ratio divides by the mean of both.
    const es = report.e2e.algs.ES384 as {
      ratio: number;
      cellcds: { rps: number };
      baseline: { rps: number };
      baselineAfter: { rps: number };
    };
    expect(es.baselineAfter.rps).to.be.greaterThan(0);
    expect(es.ratio).to.be.closeTo(
      es.cellcds.rps / ((es.baseline.rps + es.baselineAfter.rps) / 2),
      1e-9,
    );
    expect(report.tenants.singleAfter.rps).to.be.greaterThan(0);
    // Where the CPU went while the clock ran: read from /proc (this suite runs on Linux).
    expect(report.e2e.algs.ES384.mainThreadMsPerCall.cellcds).to.be.a('number');
    expect(report.e2e.algs.ES384.machineIdle.baseline).to.be.within(0, 1);
    expect(report.tenants.spread).to.be.greaterThan(1);
    expect(report.rotation).to.have.property('available');
    // Exactly one JSON line: the table comes before it.
    expect(lines.filter((l) => l.startsWith('{'))).to.have.length(1);
  });

  it('refuses an unknown option with a non-zero exit', async () => {
    const { code, stderr } = await runBench(['--nonsense']);
    expect(code).to.equal(1);
    expect(stderr).to.contain('unknown option');
  });

  it('refuses an unknown client algorithm with a non-zero exit', async () => {
    const { code, stderr } = await runBench(['--smoke', '--algs=HS256']);
    expect(code).to.equal(1);
    expect(stderr).to.contain('unknown algorithm(s): HS256');
  });
});
