import { expect } from 'chai';
import { hookOutcomeForStatus, Metrics } from '../../server/metrics.ts';
import type { HookOutcome, JobProgress } from '../../server/metrics.ts';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

interface Exposition {
  types: Map<string, string>;
  help: Map<string, string>;
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

/**
 * A strict parser of the Prometheus text exposition format (0.0.4): throws on any line that
 * is not HELP, TYPE, blank or a well-formed sample of a declared family.
 */
function parseExposition(text: string): Exposition {
  const types = new Map<string, string>();
  const help = new Map<string, string>();
  const samples: Sample[] = [];
  const seen = new Set<string>();
  const lines = text.split('\n');
  expect(lines.at(-1), 'text ends with a newline').to.equal('');
  for (const [n, line] of lines.entries()) {
    const where = `line ${n + 1}: ${line}`;
    if (line === '') {
      continue;
    }
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
      if (!m) {
        throw new Error(`bad comment, ${where}`);
      }
      const [, kind, name, rest] = m as unknown as [string, string, string, string];
      if (!METRIC_NAME.test(name)) {
        throw new Error(`bad metric name, ${where}`);
      }
      if (kind === 'TYPE') {
        if (!TYPES.has(rest) || types.has(name)) {
          throw new Error(`bad or repeated TYPE, ${where}`);
        }
        types.set(name, rest);
      } else {
        help.set(name, rest);
      }
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)( \d+)?$/.exec(line);
    if (!m) {
      throw new Error(`bad sample, ${where}`);
    }
    const name = m[1]!;
    const labels: Record<string, string> = {};
    if (m[2]) {
      let rest = m[2].slice(1, -1);
      while (rest.length > 0) {
        const lm = /^([^=]+)="((?:[^"\\]|\\[\\"n])*)"(,|$)/.exec(rest);
        if (!lm || !LABEL_NAME.test(lm[1]!)) {
          throw new Error(`bad labels, ${where}`);
        }
        if (Object.hasOwn(labels, lm[1]!)) {
          throw new Error(`repeated label, ${where}`);
        }
        labels[lm[1]!] = lm[2]!.replace(/\\n/g, '\n').replace(/\\(["\\])/g, '$1');
        rest = rest.slice(lm[0].length);
      }
    }
    // Values as Prometheus reads them (Go's ParseFloat: NaN and Inf in any case). prom-client
    // writes an empty event-loop histogram's mean as `Nan`.
    const raw = m[3]!;
    const special = /^([+-]?)(nan|inf|infinity)$/i.exec(raw);
    const value = special
      ? special[2]!.toLowerCase() === 'nan'
        ? Number.NaN
        : special[1] === '-'
          ? -Infinity
          : Infinity
      : Number(raw);
    if (!special && (raw.trim() !== raw || raw === '' || Number.isNaN(value))) {
      throw new Error(`bad value, ${where}`);
    }
    const family = [name, name.replace(/_(bucket|sum|count)$/, '')].find((f) => types.has(f));
    if (!family) {
      throw new Error(`sample of an undeclared family, ${where}`);
    }
    if (family !== name && types.get(family) !== 'histogram' && types.get(family) !== 'summary') {
      throw new Error(`suffix on a ${types.get(family)}, ${where}`);
    }
    const key = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    if (seen.has(key)) {
      throw new Error(`duplicate series, ${where}`);
    }
    seen.add(key);
    samples.push({ name, labels, value });
  }
  // Histograms: cumulative buckets ending in +Inf, equal to _count.
  for (const [family, type] of types) {
    if (type !== 'histogram') {
      continue;
    }
    for (const count of samples.filter((s) => s.name === `${family}_count`)) {
      const { le: _none, ...series } = count.labels;
      const buckets = samples.filter(
        (s) =>
          s.name === `${family}_bucket` &&
          JSON.stringify(
            Object.entries(s.labels)
              .filter(([k]) => k !== 'le')
              .sort(),
          ) === JSON.stringify(Object.entries(series).sort()),
      );
      expect(buckets.length, `${family} buckets`).to.be.greaterThan(0);
      expect(buckets.at(-1)!.labels.le).to.equal('+Inf');
      expect(buckets.at(-1)!.value).to.equal(count.value);
      for (let i = 1; i < buckets.length; i++) {
        expect(buckets[i]!.value).to.be.at.least(buckets[i - 1]!.value);
      }
    }
  }
  return { types, help, samples };
}

function value(e: Exposition, name: string, labels: Record<string, string> = {}): number {
  const matches = e.samples.filter(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
  );
  return matches.reduce((n, s) => n + s.value, 0);
}

describe('server/ metrics', () => {
  it('renders valid Prometheus text with process metrics and a region label on every series', async () => {
    const metrics = new Metrics({ region: 'eu-west' });
    metrics.observeHook('call', 'med-safety-order-sign', 'ok', 0.042);
    const text = await metrics.render();
    expect(metrics.contentType).to.match(/^text\/plain; version=0\.0\.4/);
    const e = parseExposition(text);
    for (const family of [
      'cellcds_hook_duration_seconds',
      'cellcds_rule_failures_total',
      'cellcds_prefetch_fetches_total',
      'cellcds_auth_failures_total',
      'cellcds_rewrap_jobs_running',
      'cellcds_rewrap_records_done',
      'cellcds_rewrap_records_total',
      'cellcds_rewrap_jobs_finished_total',
      'process_cpu_seconds_total',
      'nodejs_heap_size_used_bytes',
    ]) {
      expect(e.types.has(family), family).to.equal(true);
      expect(e.help.get(family), family).to.be.a('string').and.not.equal('');
    }
    expect(e.types.get('cellcds_hook_duration_seconds')).to.equal('histogram');
    expect(e.samples.length).to.be.greaterThan(20);
    for (const s of e.samples) {
      expect(s.labels.region, s.name).to.equal('eu-west');
    }
  });

  it('moves as calls are observed: hooks, rules, prefetch, auth failures', async () => {
    const metrics = new Metrics({ region: 'us-east', defaultMetrics: false });
    const before = parseExposition(await metrics.render());
    expect(value(before, 'cellcds_hook_duration_seconds_count')).to.equal(0);

    metrics.observeHook('call', 'order-sign-svc', 'ok', 0.03);
    metrics.observeHook('call', 'order-sign-svc', 'ok', 0.3);
    metrics.observeHook('call', 'order-sign-svc', 'prefetch_failed', 0.5);
    metrics.observeHook('call', undefined, 'unauthorized', 0.002);
    metrics.observeHook('discovery', undefined, 'misdirected', 0.001);
    metrics.ruleTrace('med-safety', [
      { ruleId: 'warfarin-nsaid', status: 'error' },
      { ruleId: 'warfarin-nsaid', status: 'timeout' },
      { ruleId: 'qt-prolongation', status: 'ok' },
      { ruleId: 'duplicate-therapy', status: 'error' },
      { ruleId: 'opioid-benzo', status: 'skipped' },
    ]);
    const observer = metrics.prefetchObserver();
    observer.onFetch?.('ok', 'patient');
    observer.onFetch?.('ok', 'medications');
    observer.onFetch?.('timeout', 'conditions');
    metrics.prefetchFetch('refused');
    metrics.authFailure('bad_signature');
    metrics.authFailure('replayed');
    metrics.authFailure('replayed');
    metrics.authFailure('unknown token', 'admin');

    const after = parseExposition(await metrics.render());
    const hook = 'cellcds_hook_duration_seconds_count';
    expect(value(after, hook)).to.equal(5);
    expect(value(after, hook, { service: 'order-sign-svc', outcome: 'ok' })).to.equal(2);
    expect(value(after, hook, { service: 'order-sign-svc', outcome: 'prefetch_failed' })).to.equal(
      1,
    );
    expect(value(after, hook, { service: 'none', outcome: 'unauthorized' })).to.equal(1);
    expect(value(after, hook, { endpoint: 'discovery', outcome: 'misdirected' })).to.equal(1);
    expect(
      value(after, 'cellcds_hook_duration_seconds_sum', {
        service: 'order-sign-svc',
        outcome: 'ok',
      }),
    ).to.be.closeTo(0.33, 1e-9);
    expect(
      value(after, 'cellcds_hook_duration_seconds_bucket', {
        service: 'order-sign-svc',
        outcome: 'ok',
        le: '0.05',
      }),
    ).to.equal(1);

    const rules = 'cellcds_rule_failures_total';
    expect(value(after, rules)).to.equal(4);
    // Skipped (the call's budget was spent before it started): no card from it either.
    expect(
      value(after, rules, { pack: 'med-safety', rule: 'opioid-benzo', outcome: 'skipped' }),
    ).to.equal(1);
    expect(
      value(after, rules, { pack: 'med-safety', rule: 'warfarin-nsaid', outcome: 'error' }),
    ).to.equal(1);
    expect(
      value(after, rules, { pack: 'med-safety', rule: 'warfarin-nsaid', outcome: 'timeout' }),
    ).to.equal(1);
    expect(value(after, rules, { rule: 'qt-prolongation' })).to.equal(0);

    const fetches = 'cellcds_prefetch_fetches_total';
    expect(value(after, fetches, { outcome: 'ok' })).to.equal(2);
    expect(value(after, fetches, { outcome: 'timeout' })).to.equal(1);
    expect(value(after, fetches, { outcome: 'refused' })).to.equal(1);
    // The prefetch key is not a label.
    expect(
      after.samples.filter((s) => s.name === fetches).every((s) => !('key' in s.labels)),
    ).to.equal(true);

    const auth = 'cellcds_auth_failures_total';
    expect(value(after, auth, { surface: 'cds', reason: 'replayed' })).to.equal(2);
    expect(value(after, auth, { surface: 'cds', reason: 'bad_signature' })).to.equal(1);
    expect(value(after, auth, { surface: 'admin', reason: 'unknown_token' })).to.equal(1);
  });

  it('counts where evaluations ran (inline, worker, handed off) from the evaluator, on each scrape', async () => {
    let stats = { calls: 0, inline: 0, handedOff: 0 };
    const metrics = new Metrics({
      region: 'us-east',
      defaultMetrics: false,
      evaluations: () => stats,
    });
    const name = 'cellcds_evaluations_total';
    const first = parseExposition(await metrics.render());
    expect(first.types.get(name)).to.equal('counter');
    expect(value(first, name)).to.equal(0);
    stats = { calls: 10, inline: 7, handedOff: 1 };
    const second = parseExposition(await metrics.render());
    expect(value(second, name, { where: 'inline' })).to.equal(7);
    expect(value(second, name, { where: 'worker' })).to.equal(3);
    expect(value(second, name, { where: 'handed_off' })).to.equal(1);
    stats = { calls: 12, inline: 8, handedOff: 1 };
    const third = parseExposition(await metrics.render());
    expect(value(third, name, { where: 'inline' })).to.equal(8);
    expect(value(third, name, { where: 'worker' })).to.equal(4);
    expect(value(third, name, { where: 'handed_off' })).to.equal(1);
  });

  it('sums rewrap job progress by kind, never by tenant, and counts a finished job once', async () => {
    const metrics = new Metrics({ region: 'eu-west', defaultMetrics: false });
    metrics.jobProgress({
      id: 'rewrap.eu-hospital.1',
      kind: 'dek-rewrap',
      status: 'running',
      done: 10,
      total: 100,
    });
    metrics.jobProgress({
      id: 'rewrap.eu-clinic.1',
      kind: 'dek-rewrap',
      status: 'running',
      done: 5,
      total: 50,
    });
    metrics.jobProgress({
      id: 'kek.eu-west.2',
      kind: 'kek-rewrap',
      status: 'running',
      done: 1,
      total: 2,
    });
    let e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_jobs_running', { kind: 'dek-rewrap' })).to.equal(2);
    expect(value(e, 'cellcds_rewrap_records_done', { kind: 'dek-rewrap' })).to.equal(15);
    expect(value(e, 'cellcds_rewrap_records_total', { kind: 'dek-rewrap' })).to.equal(150);
    expect(value(e, 'cellcds_rewrap_records_done', { kind: 'kek-rewrap' })).to.equal(1);

    metrics.jobProgress({
      id: 'rewrap.eu-hospital.1',
      kind: 'dek-rewrap',
      status: 'running',
      done: 60,
      total: 100,
    });
    metrics.jobProgress({
      id: 'rewrap.eu-clinic.1',
      kind: 'dek-rewrap',
      status: 'done',
      done: 50,
      total: 50,
    });
    metrics.jobProgress({
      id: 'rewrap.eu-clinic.1',
      kind: 'dek-rewrap',
      status: 'done',
      done: 50,
      total: 50,
    });
    e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_jobs_running', { kind: 'dek-rewrap' })).to.equal(1);
    expect(value(e, 'cellcds_rewrap_records_done', { kind: 'dek-rewrap' })).to.equal(60);
    expect(
      value(e, 'cellcds_rewrap_jobs_finished_total', { kind: 'dek-rewrap', status: 'done' }),
    ).to.equal(1);

    const text = await metrics.render();
    for (const tenant of ['eu-hospital', 'eu-clinic']) {
      expect(text).not.to.include(tenant);
    }
  });

  it('polls a job source on each render, and still answers when it fails', async () => {
    let jobs: JobProgress[] = [
      { id: 'rewrap.t1.1', kind: 'dek-rewrap', status: 'running', done: 3, total: 9 },
    ];
    let fail = false;
    const metrics = new Metrics({
      region: 'eu-west',
      defaultMetrics: false,
      jobs: () => (fail ? Promise.reject(new Error('store down')) : Promise.resolve(jobs)),
    });
    let e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_records_done', { kind: 'dek-rewrap' })).to.equal(3);
    jobs = [{ id: 'rewrap.t1.1', kind: 'dek-rewrap', status: 'done', done: 9, total: 9 }];
    e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_jobs_running')).to.equal(0);
    expect(value(e, 'cellcds_rewrap_jobs_finished_total', { status: 'done' })).to.equal(1);
    jobs = [{ id: 'kek.eu-west.2', kind: 'kek-rewrap', status: 'running', done: 0, total: 4 }];
    e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_jobs_running', { kind: 'kek-rewrap' })).to.equal(1);
    // A running job that is no longer listed leaves the gauges, not counted as finished.
    jobs = [];
    e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_jobs_running')).to.equal(0);
    expect(value(e, 'cellcds_rewrap_records_total')).to.equal(0);
    expect(value(e, 'cellcds_rewrap_jobs_finished_total')).to.equal(1);
    fail = true;
    e = parseExposition(await metrics.render());
    expect(value(e, 'cellcds_rewrap_jobs_finished_total', { status: 'done' })).to.equal(1);
  });

  it('keeps label values bounded: caller-made ids become none, invalid or other', async () => {
    const metrics = new Metrics({ region: 'us-east', defaultMetrics: false, maxLabelValues: 3 });
    for (const id of ['a', 'b', 'c', 'd', 'e']) {
      metrics.observeHook('call', `svc-${id}`, 'ok', 0.01);
    }
    metrics.observeHook('call', 'John Smith "MRN 12345"', 'ok', 0.01);
    metrics.observeHook('call', 'x'.repeat(500), 'ok', 0.01);
    metrics.observeHook('call', 'svc-a', 'weird' as HookOutcome, Number.NaN);
    const e = parseExposition(await metrics.render());
    const services = new Set(
      e.samples
        .filter((s) => s.name === 'cellcds_hook_duration_seconds_count')
        .map((s) => s.labels.service),
    );
    expect([...services].sort()).to.deep.equal(['invalid', 'other', 'svc-a', 'svc-b', 'svc-c']);
    expect(value(e, 'cellcds_hook_duration_seconds_count', { service: 'other' })).to.equal(2);
    expect(
      value(e, 'cellcds_hook_duration_seconds_count', { service: 'svc-a', outcome: 'error' }),
    ).to.equal(1);
    expect(await metrics.render()).not.to.include('Smith');
  });

  it('gives each app its own registry (two planes in one process do not collide)', async () => {
    const us = new Metrics({ region: 'us-east' });
    const eu = new Metrics({ region: 'eu-west' });
    us.authFailure('expired');
    const euText = parseExposition(await eu.render());
    const usText = parseExposition(await us.render());
    expect(value(usText, 'cellcds_auth_failures_total')).to.equal(1);
    expect(value(euText, 'cellcds_auth_failures_total')).to.equal(0);
    expect(euText.samples.every((s) => s.labels.region === 'eu-west')).to.equal(true);
  });

  it('maps response statuses to hook outcomes', () => {
    const table: Array<[number, HookOutcome]> = [
      [200, 'ok'],
      [204, 'ok'],
      [400, 'client_error'],
      [401, 'unauthorized'],
      [404, 'client_error'],
      [412, 'prefetch_failed'],
      [413, 'client_error'],
      [421, 'misdirected'],
      [500, 'error'],
      [503, 'error'],
    ];
    for (const [status, outcome] of table) {
      expect(hookOutcomeForStatus(status), String(status)).to.equal(outcome);
    }
  });
});
