/**
 * Moves every FHIR date/dateTime/instant in a JSON value by a whole number of days, the way
 * the CDC and PDDI IGs' "dataDateRoller" does, so a recorded patient (e.g. Synthea, whose
 * data ends around 2021) can be replayed as if seen today and lookback windows still match.
 */
const DATE = /^(\d{4})-(\d{2})-(\d{2})$/;
const DATE_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2})$/;

export function shiftDates<T>(value: T, days: number): T {
  return walk(value, days) as T;
}

function walk(value: unknown, days: number): unknown {
  if (typeof value === 'string') {
    return shiftString(value, days);
  }
  if (Array.isArray(value)) {
    return value.map((v) => walk(v, days));
  }
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) {
      out[k] = walk(v, days);
    }
    return out;
  }
  return value;
}

function shiftString(s: string, days: number): string {
  const ms = days * 86_400_000;
  if (DATE.test(s)) {
    const d = new Date(`${s}T00:00:00Z`);
    return Number.isNaN(d.getTime()) ? s : new Date(d.getTime() + ms).toISOString().slice(0, 10);
  }
  if (DATE_TIME.test(s)) {
    const d = new Date(s);
    if (Number.isNaN(d.getTime())) {
      return s;
    }
    // Keep the original offset text: shift the UTC instant and re-render in UTC.
    return new Date(d.getTime() + ms).toISOString().replace('.000Z', 'Z');
  }
  return s;
}

/** Whole days from `from` to `to`. */
export function daysBetween(from: Date, to: Date): number {
  return Math.floor((to.getTime() - from.getTime()) / 86_400_000);
}
