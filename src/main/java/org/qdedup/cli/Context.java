package org.qdedup.cli;

import java.io.PrintStream;

/** The output streams of the command line being run (tests run several in one JVM, one at a time per thread). */
final class Context {
    private static final ThreadLocal<PrintStream[]> STREAMS = new ThreadLocal<>();

    private Context() {
    }

    static void set(PrintStream out, PrintStream err) {
        STREAMS.set(new PrintStream[]{out, err});
    }

    static void clear() {
        STREAMS.remove();
    }

    static PrintStream out() {
        PrintStream[] s = STREAMS.get();
        return s == null ? System.out : s[0];
    }

    static PrintStream err() {
        PrintStream[] s = STREAMS.get();
        return s == null ? System.err : s[1];
    }
}
