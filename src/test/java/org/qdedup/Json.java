package org.qdedup;

import java.math.BigDecimal;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A tiny JSON reader for tests: objects become {@link LinkedHashMap}, arrays {@link List}, numbers
 * {@link BigDecimal} (so 1 and 1.0 differ by scale; compare with {@link #sameValue}), strings, booleans, null.
 * Also a "subset" comparison that lists every path where the actual value lacks or differs from the expected one.
 */
final class Json {
    private final String s;
    private int i;

    private Json(String s) {
        this.s = s;
    }

    /** Parses one JSON value; trailing whitespace is allowed, anything else after it is an error. */
    static Object parse(String text) {
        Json p = new Json(text);
        p.ws();
        Object v = p.value();
        p.ws();
        if (p.i != text.length()) {
            throw p.error("trailing characters");
        }
        return v;
    }

    private IllegalArgumentException error(String what) {
        int from = Math.max(0, i - 30);
        int to = Math.min(s.length(), i + 30);
        return new IllegalArgumentException("JSON: " + what + " at " + i + " near «" + s.substring(from, to) + "»");
    }

    private void ws() {
        while (i < s.length() && Character.isWhitespace(s.charAt(i))) {
            i++;
        }
    }

    private void expect(char c) {
        if (i >= s.length() || s.charAt(i) != c) {
            throw error("expected '" + c + "'");
        }
        i++;
    }

    private Object value() {
        if (i >= s.length()) {
            throw error("unexpected end");
        }
        char c = s.charAt(i);
        switch (c) {
            case '{': {
                i++;
                Map<String, Object> m = new LinkedHashMap<>();
                ws();
                if (s.charAt(i) == '}') {
                    i++;
                    return m;
                }
                while (true) {
                    ws();
                    String k = string();
                    ws();
                    expect(':');
                    ws();
                    if (m.put(k, value()) != null) {
                        throw error("duplicate key " + k);
                    }
                    ws();
                    if (s.charAt(i) == ',') {
                        i++;
                        continue;
                    }
                    expect('}');
                    return m;
                }
            }
            case '[': {
                i++;
                List<Object> l = new ArrayList<>();
                ws();
                if (s.charAt(i) == ']') {
                    i++;
                    return l;
                }
                while (true) {
                    ws();
                    l.add(value());
                    ws();
                    if (s.charAt(i) == ',') {
                        i++;
                        continue;
                    }
                    expect(']');
                    return l;
                }
            }
            case '"':
                return string();
            default:
                if (s.startsWith("true", i)) {
                    i += 4;
                    return Boolean.TRUE;
                }
                if (s.startsWith("false", i)) {
                    i += 5;
                    return Boolean.FALSE;
                }
                if (s.startsWith("null", i)) {
                    i += 4;
                    return null;
                }
                int start = i;
                while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) {
                    i++;
                }
                if (start == i) {
                    throw error("unexpected character");
                }
                try {
                    return new BigDecimal(s.substring(start, i));
                } catch (NumberFormatException e) {
                    throw error("bad number");
                }
        }
    }

    private String string() {
        expect('"');
        StringBuilder b = new StringBuilder();
        while (true) {
            if (i >= s.length()) {
                throw error("unterminated string");
            }
            char c = s.charAt(i++);
            if (c == '"') {
                return b.toString();
            }
            if (c != '\\') {
                b.append(c);
                continue;
            }
            char e = s.charAt(i++);
            switch (e) {
                case 'n' -> b.append('\n');
                case 't' -> b.append('\t');
                case 'r' -> b.append('\r');
                case 'b' -> b.append('\b');
                case 'f' -> b.append('\f');
                case 'u' -> {
                    b.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
                    i += 4;
                }
                default -> b.append(e);
            }
        }
    }

    static boolean sameValue(Object a, Object b) {
        if (a instanceof BigDecimal x && b instanceof BigDecimal y) {
            return x.compareTo(y) == 0;
        }
        return java.util.Objects.equals(a, b);
    }

    /**
     * Every key of every object in {@code expected} must be in {@code actual} with the same value (recursively);
     * arrays must have the same length and match element by element. Extra keys in {@code actual} are fine.
     * Returns one line per difference, such as {@code $.format-specific.data.refcount-bits: expected 16, got 8}.
     */
    static List<String> missingOrDifferent(Object expected, Object actual) {
        List<String> out = new ArrayList<>();
        diff("$", expected, actual, out);
        return out;
    }

    @SuppressWarnings("unchecked")
    private static void diff(String path, Object exp, Object act, List<String> out) {
        if (exp instanceof Map<?, ?> em) {
            if (!(act instanceof Map<?, ?> am)) {
                out.add(path + ": expected an object, got " + show(act));
                return;
            }
            for (Map.Entry<String, Object> e : ((Map<String, Object>) em).entrySet()) {
                String p = path + "." + e.getKey();
                if (!am.containsKey(e.getKey())) {
                    out.add(p + ": missing (expected " + show(e.getValue()) + ")");
                } else {
                    diff(p, e.getValue(), am.get(e.getKey()), out);
                }
            }
        } else if (exp instanceof List<?> el) {
            if (!(act instanceof List<?> al)) {
                out.add(path + ": expected an array, got " + show(act));
                return;
            }
            if (el.size() != al.size()) {
                out.add(path + ": expected " + el.size() + " elements, got " + al.size());
            }
            for (int k = 0; k < Math.min(el.size(), al.size()); k++) {
                diff(path + "[" + k + "]", el.get(k), al.get(k), out);
            }
        } else if (!sameValue(exp, act)) {
            out.add(path + ": expected " + show(exp) + ", got " + show(act));
        }
    }

    static String show(Object v) {
        if (v instanceof String str) {
            return '"' + str + '"';
        }
        if (v instanceof BigDecimal d) {
            return d.toPlainString();
        }
        return String.valueOf(v);
    }

    /** Follows a path of keys (strings) and indexes (integers); null when any step is missing. */
    static Object at(Object root, Object... path) {
        Object v = root;
        for (Object step : path) {
            if (step instanceof String k && v instanceof Map<?, ?> m) {
                v = m.get(k);
            } else if (step instanceof Integer n && v instanceof List<?> l && n < l.size()) {
                v = l.get(n);
            } else {
                return null;
            }
        }
        return v;
    }
}
