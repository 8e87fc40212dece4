/**
 * A small LRU map for the tenants layer's caches (issuer lookups, inline key sets). The rules
 * layer has the same class (rules/compile-pack.ts `LruCache`); the layering (DESIGN: tenants
 * imports only fhir-profiles) keeps them apart.
 */
export class LruCache<V> {
  private readonly map = new Map<string, V>();

  /** @throws RangeError unless `max` is a positive integer. */
  constructor(private readonly max: number) {
    if (!Number.isInteger(max) || max < 1) {
      throw new RangeError('an LRU cache holds at least one entry');
    }
  }

  /** The value, now the most recently used. */
  get(key: string): V | undefined {
    const v = this.map.get(key);
    if (v !== undefined) {
      // A Map iterates in insertion order: re-inserting keeps the least recent first.
      this.map.delete(key);
      this.map.set(key, v);
    }
    return v;
  }

  /** The value, its place left as it is. */
  peek(key: string): V | undefined {
    return this.map.get(key);
  }

  /** Sets the value; beyond `max` entries the least recently used go. */
  set(key: string, value: V): void {
    this.map.delete(key);
    this.map.set(key, value);
    while (this.map.size > this.max) {
      const oldest = this.map.keys().next();
      if (oldest.done === true) {
        break;
      }
      this.map.delete(oldest.value);
    }
  }

  get size(): number {
    return this.map.size;
  }
}
