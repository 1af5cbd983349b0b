package org.fhirdicomweb.hapitest;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.interceptor.api.IInterceptorService;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.data.jpa.JpaRepositoriesAutoConfiguration;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.orm.jpa.HibernateJpaAutoConfiguration;
import org.springframework.boot.web.servlet.FilterRegistrationBean;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.web.filter.OncePerRequestFilter;

/**
 * A HAPI FHIR JPA server (R4) for the bridge's integration tests: HAPI's own JPA configuration,
 * an H2 database in the directory the launcher gives (see application.properties), the FHIR API
 * under /fhir/R4 and a few test-only endpoints under /__admin (see {@link AdminController}).
 *
 * Settings that differ from HAPI's defaults are the ones a test server needs (expunge, so tests can
 * empty it) or that a production HAPI is commonly run with (page sizes); everything that decides
 * how the server answers the bridge (client id rules, ETags, referential integrity, search
 * semantics) is left at HAPI's default on purpose.
 */
// Spring Boot's own JPA and Elasticsearch set-up would compete with HAPI's (HAPI's classpath has an
// Elasticsearch client, for its optional full-text indexing, which is off here).
@SpringBootApplication(exclude = {
		HibernateJpaAutoConfiguration.class,
		JpaRepositoriesAutoConfiguration.class,
		ElasticsearchRestClientAutoConfiguration.class})
@Import({JpaR4Config.class, HapiJpaConfig.class, ThreadPoolFactoryConfig.class, JpaBatch2Config.class,
		Batch2JobsConfig.class, SubscriptionChannelConfig.class})
public class HapiTestServer {

	public static void main(String[] args) {
		exitWhenParentDies(System.getenv("HAPI_PARENT_PID"));
		SpringApplication.run(HapiTestServer.class, args);
	}

	/** A test run killed without stopping its servers leaves no JVM behind. */
	private static void exitWhenParentDies(String parentPid) {
		if (parentPid == null || parentPid.isBlank()) {
			return;
		}
		ProcessHandle parent = ProcessHandle.of(Long.parseLong(parentPid.trim())).orElse(null);
		Thread watcher = new Thread(() -> {
			while (parent != null && parent.isAlive()) {
				try {
					Thread.sleep(1000);
				} catch (InterruptedException e) {
					return;
				}
			}
			System.exit(0);
		}, "parent-watcher");
		watcher.setDaemon(true);
		watcher.start();
	}

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// Tests empty the server between tests with $expunge (everything).
		settings.setExpungeEnabled(true);
		settings.setDeleteExpungeEnabled(true);
		settings.setAllowMultipleDelete(true);
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		Properties jpa = new Properties();
		jpa.put("hibernate.dialect", "ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect");
		jpa.put("hibernate.hbm2ddl.auto", "update");
		jpa.put("hibernate.search.enabled", "false");
		jpa.put("hibernate.format_sql", "false");
		jpa.put("hibernate.show_sql", "false");
		factory.setJpaProperties(jpa);
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		return new JpaTransactionManager(entityManagerFactory);
	}

	@Bean
	public RequestCounter requestCounter() {
		return new RequestCounter();
	}

	@Bean
	public FilterRegistrationBean<OncePerRequestFilter> requestCounterFilter(RequestCounter counter) {
		FilterRegistrationBean<OncePerRequestFilter> registration =
				new FilterRegistrationBean<>(counter.servletFilter());
		registration.addUrlPatterns("/fhir/R4/*");
		return registration;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviders,
			IJpaSystemProvider systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider,
			IInterceptorService interceptors,
			RequestCounter counter) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviders.createProviders());
		server.registerProvider(systemProvider);
		server.setServerConformanceProvider(new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport));
		// The page sizes of hapi-fhir-jpaserver-starter's defaults, as many installations keep them.
		pagingProvider.setDefaultPageSize(20);
		pagingProvider.setMaximumPageSize(200);
		server.setPagingProvider(pagingProvider);
		server.registerInterceptor(counter.serverHooks());
		interceptors.registerInterceptor(counter.storageHooks());
		ServletRegistrationBean<RestfulServer> registration =
				new ServletRegistrationBean<>(server, "/fhir/R4/*");
		registration.setName("fhir");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
