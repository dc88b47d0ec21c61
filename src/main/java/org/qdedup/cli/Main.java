package org.qdedup.cli;

import java.io.IOException;
import java.io.PrintStream;
import java.io.PrintWriter;
import java.io.UncheckedIOException;
import org.qdedup.io.NativeFs;
import picocli.CommandLine;
import picocli.CommandLine.Command;

/** The qdedup command line: a thin layer over the library, qemu-img's names, flags, keys and exit codes. */
@Command(name = "qdedup", versionProvider = Main.Version.class,
        description = "QCOW2 images with online deduplication.")
public final class Main implements Runnable {
    /** Every command, in the order --help lists them. */
    private static final java.util.List<Class<?>> COMMANDS = java.util.List.of(InfoCommand.class, MapCommand.class,
            CheckCommand.class, CompareCommand.class, ConvertCommand.class, CreateCommand.class, SnapshotCommand.class,
            ResizeCommand.class, CommitCommand.class, RebaseCommand.class, StatsCommand.class, EstimateCommand.class,
            DedupCommand.class, ServeCommand.class, DemoCommand.class, CommandLine.HelpCommand.class);

    @CommandLine.Spec
    CommandLine.Model.CommandSpec spec;

    @Override
    public void run() {
        throw new CommandLine.ParameterException(spec.commandLine(), "a command is required (see qdedup --help)");
    }

    public static void main(String[] args) {
        // Linking the native calls spins method handles and a stub (about 10 ms): done on the other core while picocli
        // parses the command line (a caller that needs NativeFs first simply waits for its class initialisation).
        Thread.ofPlatform().daemon().name("qdedup-warm-up").start(NativeFs::available);
        int rc = run(args, System.out, System.err);
        System.out.flush();
        System.err.flush();
        // Everything is closed and flushed and qdedup has no shutdown hooks; System.exit would first set up the JDK's
        // System.Logger to log the exit (10-20 ms, more with a cold page cache). The launcher asks for a normal exit
        // when JVM options are added, so that tools hooked on it (a flight recording, an agent) still finish.
        if (Boolean.getBoolean("qdedup.exitHooks")) {
            System.exit(rc);
        }
        Runtime.getRuntime().halt(rc);
    }

    /** Runs one command line with the given streams and returns its exit code; never calls System.exit. */
    public static int run(String[] args, PrintStream out, PrintStream err) {
        CommandLine cl = new CommandLine(new Main());
        addCommands(cl, args);
        PrintWriter ow = new PrintWriter(out, true);
        PrintWriter ew = new PrintWriter(err, true);
        cl.setOut(ow);
        cl.setErr(ew);
        cl.setCaseInsensitiveEnumValuesAllowed(true);
        // "resize IMG -1G": a size may start with '-'.
        CommandLine resize = cl.getSubcommands().get("resize");
        if (resize != null) {
            resize.setUnmatchedOptionsArePositionalParams(true);
        }
        cl.setParameterExceptionHandler((ex, a) -> {
            ew.println("qdedup: " + ex.getMessage());
            ew.flush();
            return 1;
        });
        LAST_INTERNAL_ERROR.remove();
        cl.setExecutionExceptionHandler((ex, c, parsed) -> {
            String line = describe(ex);
            if (line.startsWith("internal error")) {
                LAST_INTERNAL_ERROR.set(ex);
            }
            ew.println("qdedup: " + line);
            ew.flush();
            if (System.getenv("QDEDUP_DEBUG") != null || Boolean.getBoolean("qdedup.debug")) {
                ex.printStackTrace(err);
            }
            return ex instanceof CliException ce ? ce.exitCode : 1;
        });
        Context.set(out, err);
        try {
            int rc = cl.execute(args);
            ow.flush();
            ew.flush();
            return rc;
        } finally {
            out.flush();
            err.flush();
            Context.clear();
        }
    }

    /**
     * Registers the one command the arguments name, or all of them when they name none (help, a typo): picocli
     * builds a command's model by reflection over old-format classes the JVM cannot archive, which is most of the
     * start-up time when done for every command. The help and version options (a mixin, more reflection: about
     * 10 ms of a cold start) come only where the arguments may ask for them.
     */
    private static void addCommands(CommandLine cl, String[] args) {
        String first = args.length > 0 ? args[0] : "";
        for (Class<?> c : COMMANDS) {
            Command a = c.getAnnotation(Command.class);
            if (a.name().equals(first) && !first.equals("help")) {
                addCommand(cl, c, mayAskForHelp(args));
                return;
            }
        }
        cl.getCommandSpec().mixinStandardHelpOptions(true); // "qdedup --help", "qdedup -V"
        for (Class<?> c : COMMANDS) {
            addCommand(cl, c, true);
        }
    }

    /**
     * Whether an argument may be -h, --help, -V or --version: those, a cluster of short options holding h or V, or
     * an @file (picocli reads arguments from it). A false positive only costs the start-up time saved otherwise.
     */
    static boolean mayAskForHelp(String[] args) {
        for (String a : args) {
            if (a.equals("--help") || a.equals("--version") || a.startsWith("@")
                    || (a.startsWith("-") && !a.startsWith("--") && (a.indexOf('h') > 0 || a.indexOf('V') > 0))) {
                return true;
            }
        }
        return false;
    }

    /** Adds a command, with -h/--help and -V/--version of its own ("qdedup COMMAND --help", as the contract has it). */
    private static void addCommand(CommandLine cl, Class<?> c, boolean helpOptions) {
        cl.addSubcommand(c);
        if (c != CommandLine.HelpCommand.class && helpOptions) {
            CommandLine sub = cl.getSubcommands().get(c.getAnnotation(Command.class).name());
            sub.getCommandSpec().mixinStandardHelpOptions(true);
            sub.getCommandSpec().versionProvider(new Version()); // else "qdedup info -V" printed nothing
        }
    }

    private static final ThreadLocal<Throwable> LAST_INTERNAL_ERROR = new ThreadLocal<>();

    /** The exception behind this thread's last "internal error" line of {@link #run}, or null (for test reports). */
    public static Throwable lastInternalError() {
        return LAST_INTERNAL_ERROR.get();
    }

    /** One line for an error: our own messages already name the file; others get their type. */
    static String describe(Throwable ex) {
        Throwable t = ex;
        if (t instanceof UncheckedIOException u) {
            t = u.getCause();
        }
        if (t instanceof IOException || t instanceof IllegalArgumentException || t instanceof CliException) {
            String m = t.getMessage();
            return m == null ? t.getClass().getSimpleName() : org.qdedup.format.FormatException.printable(m);
        }
        if (t instanceof OutOfMemoryError) {
            return "out of memory (raise the heap with QDEDUP_JAVA_OPTS=-Xmx...)";
        }
        return "internal error: " + t;
    }

    /** Version from the jar manifest. */
    static final class Version implements CommandLine.IVersionProvider {
        @Override
        public String[] getVersion() {
            String v = Main.class.getPackage().getImplementationVersion();
            return new String[]{"qdedup " + (v == null ? "dev" : v)};
        }
    }
}
