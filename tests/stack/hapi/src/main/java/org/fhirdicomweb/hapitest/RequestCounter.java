package org.fhirdicomweb.hapitest;

import ca.uhn.fhir.interceptor.api.Hook;
import ca.uhn.fhir.interceptor.api.Interceptor;
import ca.uhn.fhir.interceptor.api.Pointcut;
import ca.uhn.fhir.rest.api.server.RequestDetails;
import jakarta.servlet.FilterChain;
import jakarta.servlet.ServletException;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import java.io.IOException;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;
import org.hl7.fhir.instance.model.api.IBaseResource;
import org.hl7.fhir.r4.model.Bundle;
import org.springframework.web.filter.OncePerRequestFilter;

/**
 * Request counters with the shape of the Medplum test server's /__admin/stats, so a test can
 * assert "this run wrote nothing" or "this cycle sent no request" on either engine.
 *
 * A servlet filter counts top-level FHIR requests (by method, interaction and status); HAPI's
 * storage hooks count every create, update and delete handed to the database, bundle entries
 * included; reads and searches are the top-level ones plus the GET entries of bundles.
 *
 * The filter counts a request once HAPI is done with it, and by then its client may already hold
 * the whole answer: a test that asks for the stats straight after could see it uncounted, and a
 * reset straight after could see it counted afterwards. So the stats and a reset first wait (up to
 * SETTLE_NANOS) until every request that arrived before them is counted.
 */
public class RequestCounter {

	private static final String BASE = "/fhir/R4";
	private static final String BUNDLE_TYPE = RequestCounter.class.getName() + ".bundleType";
	private static final long SETTLE_NANOS = 5_000_000_000L;

	private long requests;
	private long reads;
	private long searches;
	private long bundleEntries;
	private final Map<String, Long> byMethod = new TreeMap<>();
	private final Map<String, Long> byInteraction = new TreeMap<>();
	private final Map<String, Long> byStatus = new TreeMap<>();
	private final Map<String, Long> writesByKind = new TreeMap<>();
	private long arrivals;
	private final TreeSet<Long> uncounted = new TreeSet<>();

	public RequestCounter() {
		reset();
	}

	public synchronized void reset() {
		settle();
		requests = 0;
		reads = 0;
		searches = 0;
		bundleEntries = 0;
		byMethod.clear();
		byInteraction.clear();
		byStatus.clear();
		writesByKind.clear();
		writesByKind.put("create", 0L);
		writesByKind.put("update", 0L);
		writesByKind.put("delete", 0L);
	}

	public synchronized Map<String, Object> snapshot() {
		settle();
		Map<String, Object> stats = new LinkedHashMap<>();
		stats.put("requests", requests);
		stats.put("reads", reads);
		stats.put("searches", searches);
		stats.put("writes", writesByKind.values().stream().mapToLong(Long::longValue).sum());
		stats.put("bundle_entries", bundleEntries);
		stats.put("by_method", new TreeMap<>(byMethod));
		stats.put("by_interaction", new TreeMap<>(byInteraction));
		stats.put("by_status", new TreeMap<>(byStatus));
		stats.put("writes_by_kind", new TreeMap<>(writesByKind));
		return stats;
	}

	/** Waits, the lock released meanwhile, until the requests that arrived before this call are counted. */
	private void settle() {
		long before = arrivals;
		long deadline = System.nanoTime() + SETTLE_NANOS;
		while (!uncounted.isEmpty() && uncounted.first() <= before) {
			long left = deadline - System.nanoTime();
			if (left <= 0) {
				return;
			}
			try {
				wait(Math.max(1L, left / 1_000_000L));
			} catch (InterruptedException e) {
				Thread.currentThread().interrupt();
				return;
			}
		}
	}

	private synchronized long arrive() {
		arrivals++;
		uncounted.add(arrivals);
		return arrivals;
	}

	private synchronized void countRequest(long arrival, String method, String interaction, int status) {
		uncounted.remove(arrival);
		notifyAll();
		requests++;
		byMethod.merge(method, 1L, Long::sum);
		byInteraction.merge(interaction, 1L, Long::sum);
		byStatus.merge(Integer.toString(status), 1L, Long::sum);
		if (interaction.equals("read") || interaction.equals("vread")) {
			reads++;
		} else if (interaction.equals("search-type")) {
			searches++;
		}
	}

	private synchronized void countWrite(String kind) {
		writesByKind.merge(kind, 1L, Long::sum);
	}

	/**
	 * The storage hooks, for HAPI's JPA interceptor service.  (HAPI's DAOs call the hooks of that
	 * service and of the REST server's, so each set is registered with one of them only.)
	 */
	public Object storageHooks() {
		return new StorageHooks();
	}

	/** The REST hooks, for the REST server's interceptor service. */
	public Object serverHooks() {
		return new ServerHooks();
	}

	@Interceptor
	private final class StorageHooks {
		@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_CREATED)
		public void created(IBaseResource resource) {
			countWrite("create");
		}

		@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_UPDATED)
		public void updated(IBaseResource resource) {
			countWrite("update");
		}

		@Hook(Pointcut.STORAGE_PRESTORAGE_RESOURCE_DELETED)
		public void deleted(IBaseResource resource) {
			countWrite("delete");
		}
	}

	@Interceptor
	private final class ServerHooks {
		@Hook(Pointcut.SERVER_INCOMING_REQUEST_PRE_HANDLED)
		public void preHandled(RequestDetails request) {
			countBundle(request);
		}
	}

	/** Bundles: their type names the interaction, their GET entries are reads or searches. */
	private void countBundle(RequestDetails request) {
		if (request.isSubRequest() || !(request.getResource() instanceof Bundle bundle)) {
			return;
		}
		if (request.getResourceName() != null || request.getId() != null) {
			return;
		}
		request.getUserData().put(BUNDLE_TYPE, bundle.getType() == null ? "batch" : bundle.getType().toCode());
		synchronized (this) {
			for (Bundle.BundleEntryComponent entry : bundle.getEntry()) {
				bundleEntries++;
				Bundle.HTTPVerb verb = entry.getRequest().getMethod();
				if (verb == Bundle.HTTPVerb.GET) {
					String url = entry.getRequest().getUrl();
					String path = url == null ? "" : url.split("\\?", 2)[0];
					if (url != null && !url.contains("?") && path.split("/").length >= 2) {
						reads++;
					} else {
						searches++;
					}
				}
			}
		}
		RequestDetailsHolder.set(request);
	}

	/** The FHIR interaction a top-level request asks for, named as the Medplum test server names it. */
	static String interactionOf(String method, String path) {
		String[] segments = java.util.Arrays.stream(path.split("/")).filter(s -> !s.isEmpty()).toArray(String[]::new);
		if (segments.length == 0) {
			return method.equals("POST") ? "batch" : "unsupported";
		}
		if (segments[0].equals("metadata")) {
			return "capabilities";
		}
		if (segments.length == 1) {
			return switch (method) {
				case "GET" -> "search-type";
				case "POST" -> "create";
				case "PUT" -> "update";
				case "DELETE" -> "delete";
				case "PATCH" -> "patch";
				default -> "unsupported";
			};
		}
		if (segments.length == 2) {
			if (segments[1].equals("_search")) {
				return "search-type";
			}
			return switch (method) {
				case "GET" -> "read";
				case "PUT" -> "update";
				case "DELETE" -> "delete";
				case "PATCH" -> "patch";
				default -> "unsupported";
			};
		}
		if (segments[2].equals("_history")) {
			return segments.length == 3 ? "history-instance" : "vread";
		}
		return "unsupported";
	}

	/** The servlet filter that counts top-level requests; HapiTestServer maps it to the FHIR base. */
	public OncePerRequestFilter servletFilter() {
		return new OncePerRequestFilter() {
			@Override
			protected void doFilterInternal(
					HttpServletRequest request, HttpServletResponse response, FilterChain chain)
					throws ServletException, IOException {
				long arrival = arrive();
				try {
					chain.doFilter(request, response);
				} finally {
					String interaction = "unsupported";
					try {
						String path = request.getRequestURI().substring(Math.min(BASE.length(), request.getRequestURI().length()));
						String method = request.getMethod().equals("HEAD") ? "GET" : request.getMethod();
						interaction = interactionOf(method, path);
						RequestDetails details = RequestDetailsHolder.take();
						if (details != null && details.getUserData().get(BUNDLE_TYPE) instanceof String type) {
							interaction = type;
						}
					} finally {
						// counted whatever happened, so no stats request waits on it
						countRequest(arrival, request.getMethod(), interaction, response.getStatus());
					}
				}
			}
		};
	}

	/** Carries a bundle request's details from the HAPI hook to the filter, on the request's thread. */
	private static final class RequestDetailsHolder {
		private static final ThreadLocal<RequestDetails> CURRENT = new ThreadLocal<>();

		static void set(RequestDetails details) {
			CURRENT.set(details);
		}

		static RequestDetails take() {
			RequestDetails details = CURRENT.get();
			CURRENT.remove();
			return details;
		}
	}
}
